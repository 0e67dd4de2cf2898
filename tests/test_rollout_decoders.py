"""DirectDecoder internals against independent references: the model's own forward (HFDecoder, a
DynamicCache), F.scaled_dot_product_attention for the matmul decode attention, HF generate in bf16."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_rollout import PAD, PROMPTS, hf_greedy, tiny_llama, tiny_qwen2

from gradus.rollout import LocalEngine, SamplingParams
from gradus.rollout.decoders import DirectDecoder, HFDecoder, _decode_attention
from gradus.rollout.local import left_pad


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama])  # GQA 4:2 (Qwen2), 4:1 with biases (Llama)
@pytest.mark.parametrize("prompts", [PROMPTS, [[5, 9, 17], [22, 8, 31]]])  # ragged (packed prefill) / no padding
def test_direct_decoder_logits_and_cache_match_hf_forward(make, prompts):
    model, T, n = make(), 4, 2
    ids, mask = left_pad(prompts, PAD, torch.device("cpu"))  # [N, P]
    with torch.inference_mode():
        fast, ref = DirectDecoder(model, T), HFDecoder(model, T)
        got, want = fast.prefill(ids, mask, n), ref.prefill(ids, mask, n)  # [N*n, V]
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        # the packed prefill wrote k, v of every real prompt token into the padded cache layout
        valid = mask.bool().repeat_interleave(n, dim=0)  # [B, P]
        for li in range(len(fast.layers)):
            for mine, theirs in ((fast.k_cache[li], ref.cache.layers[li].keys),
                                 (fast.v_cache[li], ref.cache.layers[li].values)):
                P = ids.shape[1]
                a, b = mine[:, :, :P].transpose(1, 2)[valid], theirs.transpose(1, 2)[valid]  # [real, Hkv, D]
                assert torch.allclose(a, b, atol=1e-5, rtol=0)
        tokens = got.argmax(-1)  # [B]
        for _ in range(T - 1):
            got, want = fast.step(tokens), ref.step(tokens)  # [B, V]
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
            tokens = want.argmax(-1)


@pytest.mark.parametrize("groups", [1, 2, 4])  # q heads per kv head
def test_decode_attention_equals_sdpa(groups):
    g = torch.Generator().manual_seed(0)
    B, Hkv, t, D = 3, 2, 7, 8
    q = torch.randn(B, Hkv * groups, 1, D, generator=g)  # [B, Hq, 1, D]
    k, v = torch.randn(2, B, Hkv, t, D, generator=g)  # [B, Hkv, t, D] each
    keep = torch.rand(B, t, generator=g) > 0.3  # [B, t] key is real
    keep[:, -1] = True  # the newest key is always the query's own token
    bias = torch.zeros(B, 1, 1, t).masked_fill(~keep[:, None, None], float("-inf"))  # [B, 1, 1, t]
    got = _decode_attention(q.view(B, Hkv, groups, D), k, v, bias, 0.3).reshape(B, Hkv * groups, 1, D)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None], scale=0.3,
                                          enable_gqa=groups > 1)  # [B, Hq, 1, D]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama])
def test_bf16_greedy_matches_generate(make):
    model = make().to(torch.bfloat16)
    ref = hf_greedy(model, PROMPTS, 12, None)  # [N, T]
    engine = LocalEngine(model, pad_token_id=PAD, eos_token_ids=[], backend="direct")
    got = engine.generate(PROMPTS, 1, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert torch.equal(got.completion_ids, ref)


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_llama])
def test_hf_decoder_uses_no_deprecated_transformers_argument(make):
    # transformers warns (FutureWarning) on arguments it is about to remove, e.g. `past_key_values` -> `cache`;
    # the fallback decoder must keep working on the next release, so any such warning fails here
    model, T = make(), 3
    ids, mask = left_pad(PROMPTS, PAD, torch.device("cpu"))  # [N, P]
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        decoder = HFDecoder(model, T)
        logits = decoder.prefill(ids, mask, 2)  # [N*2, V]
        decoder.keep(torch.arange(0, logits.shape[0], 2))
        logits = decoder.step(logits[::2].argmax(-1))  # [N, V]
    assert logits.shape == (len(PROMPTS), model.config.vocab_size)
