"""Tests of gradus.rollout against independent references: HF `generate` (greedy tokens), a naive
training forward pass (log-probs), slow per-row loops (top-k / top-p), and hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gradus.rollout import (
    LocalEngine,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    sample_from_probs,
    top_k_filter,
    top_p_filter,
)
from gradus.rollout import local as local_mod
from gradus.rollout.decoders import direct_unsupported_reason

V, PAD = 50, 0
PROMPTS = [[5, 9, 17], [22, 8, 31, 40, 12, 7, 3], [44], [13, 29, 6, 18, 25]]


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True, initializer_range=0.2, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"qwen2": tiny_qwen2, "llama": tiny_llama, "gpt2": tiny_gpt2}
CASES = [("qwen2", "direct"), ("qwen2", "hf"), ("llama", "direct"), ("gpt2", "auto")]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])  # [N, P]
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # [N, P]
    return ids, mask


def hf_greedy(model, prompts: list[list[int]], T: int, eos: int | None) -> torch.Tensor:
    ids, mask = left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=T, pad_token_id=PAD,
                         eos_token_id=eos)
    return out[:, ids.shape[1]:]  # [N, T'] completions, pad after EOS


def pick_eos(model, T: int) -> int:
    """An EOS id that ends some greedy rows early while others run to max_new_tokens."""
    free = hf_greedy(model, PROMPTS, T, None)  # [N, T]
    for tok in free[:, : T // 2].flatten().tolist():
        rows_with = (free == tok).any(dim=1)  # [N]
        if tok != PAD and not rows_with.all():
            return tok
    raise AssertionError("no usable EOS in this model's greedy output")


def naive_logp(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """Log-probs of the completion tokens from one training-style forward pass."""
    mask = batch.attention_mask  # [B, P+T]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=mask, position_ids=pos).logits.float()  # [B, P+T, V]
    P = batch.completion_start
    logp = (logits[:, P - 1 : -1] / temperature).log_softmax(-1)  # [B, T, V] position i predicts i+1
    return logp.gather(2, batch.completion_ids[..., None]).squeeze(-1) * batch.completion_mask  # [B, T]


@pytest.mark.parametrize("kind,backend", CASES)
@pytest.mark.parametrize("drop", [0.0, 2.0])  # drop rows at every finish / never
def test_greedy_matches_hf_generate(kind, backend, drop, monkeypatch):
    monkeypatch.setattr(local_mod, "_DROP_FRACTION", drop)
    model, T = MODELS[kind](), 12
    eos = pick_eos(model, T)
    ref = hf_greedy(model, PROMPTS, T, eos)  # [N, T']
    engine = LocalEngine(model, pad_token_id=PAD, eos_token_ids=[eos], backend=backend)
    assert engine.uses_direct() == (backend == "direct")
    b = engine.generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=T))
    assert torch.equal(b.completion_ids[::2], ref) and torch.equal(b.completion_ids[1::2], ref)
    # the premise: some rows stop at EOS early, some run into the length limit
    assert b.truncated.any() and (~b.truncated).any() and (b.lengths < T).any()
    assert torch.allclose(b.sampling_logp, naive_logp(model, b, 1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,backend", CASES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 0.9), (1.0, 5, 0.8)])
def test_sampling_logp_equals_training_forward(kind, backend, temperature, top_k, top_p):
    model = MODELS[kind]()
    engine = LocalEngine(model, pad_token_id=PAD, eos_token_ids=[3, 4], backend=backend)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10)
    b = engine.generate(PROMPTS, 3, params, seed=1)
    ref = naive_logp(model, b, temperature)  # [B, T]
    assert torch.allclose(b.sampling_logp, ref, atol=1e-5, rtol=0)
    assert (b.sampling_logp[b.completion_mask == 0] == 0).all()
    assert b.sampling_logp.dtype == torch.float32


def test_direct_and_hf_decoders_sample_the_same_tokens():
    model = tiny_qwen2()
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=10)
    a, b = (LocalEngine(model, pad_token_id=PAD, eos_token_ids=[3], backend=be).generate(PROMPTS, 4, params,
                                                                                       seed=7)
            for be in ("direct", "hf"))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.sampling_logp, b.sampling_logp, atol=1e-5, rtol=0)


def test_seed_reproducibility_and_top_k_one_is_greedy():
    engine = LocalEngine(tiny_qwen2(), pad_token_id=PAD, eos_token_ids=[3])
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    a, b, c = (engine.generate(PROMPTS, 4, params, seed=s) for s in (11, 11, 12))
    for name in ("completion_ids", "completion_mask", "sampling_logp", "lengths", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.completion_ids, c.completion_ids)
    k1 = engine.generate(PROMPTS, 2, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10), seed=3)
    greedy = engine.generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=10))
    assert torch.equal(k1.completion_ids, greedy.completion_ids)
    assert torch.equal(k1.sampling_logp, greedy.sampling_logp)  # both at temperature 1


def slow_top_k(row: list[float], k: int) -> list[bool]:
    kth = sorted(row, reverse=True)[k - 1]
    return [x >= kth for x in row]


def slow_top_p(row: list[float], p: float) -> list[bool]:
    m = max(row)
    z = sum(math.exp(x - m) for x in row)
    keep, mass = [False] * len(row), 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        if mass >= p:
            break
        keep[i] = True
        mass += math.exp(row[i] - m) / z
    return keep


def test_filters_against_slow_loops():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 30, generator=g, dtype=torch.float64) * 2  # [B, V]
    for k in (1, 3, 10):
        got = top_k_filter(logits, k).isfinite().tolist()
        assert got == [slow_top_k(r, k) for r in logits.tolist()]
    for p in (0.05, 0.5, 0.9, 0.99):
        got = top_p_filter(logits, p).isfinite().tolist()
        assert got == [slow_top_p(r, p) for r in logits.tolist()]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()  # mass before each token: 0, 0.5, 0.8
    assert top_p_filter(logits, 0.7).isfinite().tolist() == [[True, True, False]]  # 0.5 < 0.7 <= 0.8
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False]]  # 0.5 >= 0.5 removes it
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [[True, True, True]]


def test_sample_from_probs_frequencies():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3]).repeat(40000, 1) * 3.0  # [B, 4] unnormalised on purpose
    tok = sample_from_probs(probs, torch.Generator().manual_seed(0))  # [B]
    freq = torch.bincount(tok, minlength=4).double() / tok.numel()
    assert freq[1] == 0  # a zero-probability token is never drawn
    # binomial std at n=40000 is <= 0.0025; 4 std
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64), atol=0.01)


def test_masks_lengths_truncation_and_layout():
    engine = LocalEngine(tiny_qwen2(), pad_token_id=PAD, eos_token_ids=[3, 4, 7])
    T, n = 8, 5
    b = engine.generate(PROMPTS, n, SamplingParams(temperature=1.5, max_new_tokens=T), seed=0)
    B, Tb = b.completion_ids.shape
    assert B == len(PROMPTS) * n and Tb <= T and b.prompt_ids.shape == b.prompt_mask.shape
    assert torch.equal(b.completion_mask, (torch.arange(Tb)[None] < b.lengths[:, None]).long())
    assert (b.completion_ids[b.completion_mask == 0] == PAD).all()
    assert b.num_completion_tokens == int(b.lengths.sum())
    is_eos = torch.isin(b.completion_ids, torch.tensor([3, 4, 7])) & (b.completion_mask == 1)  # [B, T]
    for i in range(B):
        L = int(b.lengths[i])
        if b.truncated[i]:
            assert L == T and not is_eos[i].any() and b.finish_reasons[i] == "length"
        else:  # exactly one EOS, the last generated token
            assert is_eos[i].nonzero().flatten().tolist() == [L - 1] and b.finish_reasons[i] == "eos"
    assert b.truncated.any() and (~b.truncated).any()
    assert torch.equal(b.prompt_index, torch.arange(len(PROMPTS)).repeat_interleave(n))
    for i in range(B):
        j = int(b.prompt_index[i])
        assert b.prompt_ids[i][b.prompt_mask[i] == 1].tolist() == PROMPTS[j]
    assert b.input_ids.shape == b.attention_mask.shape == (B, b.completion_start + Tb)
    assert not b.completion_ids.is_inference()  # usable in the trainer's autograd graph


def test_select_concat_trim_round_trip():
    engine = LocalEngine(tiny_qwen2(), pad_token_id=PAD, eos_token_ids=[3, 4])
    b = engine.generate(PROMPTS, 3, SamplingParams(temperature=1.2, max_new_tokens=9), seed=2)
    parts = [b.select([0, 1, 2]).trim(), b.select(torch.arange(3, b.batch_size)).trim()]
    assert parts[0].prompt_ids.shape[1] < b.prompt_ids.shape[1]  # trim really drops columns here
    back = RolloutBatch.concat(parts)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampling_logp",
                 "lengths", "truncated", "prompt_index"):
        assert torch.equal(getattr(back, name), getattr(b, name)), name
    rev = torch.arange(b.batch_size - 1, -1, -1)
    assert torch.equal(b.select(rev).select(rev).completion_ids, b.completion_ids)
    odd = b.select(torch.arange(b.batch_size) % 2 == 1)
    assert torch.equal(odd.lengths, b.lengths[1::2])
    assert b.to(b.device).completion_ids.device == b.device


def test_sync_and_training_flag_restored():
    a, src = tiny_qwen2(seed=0), tiny_qwen2(seed=1)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    engine = LocalEngine(a, pad_token_id=PAD, eos_token_ids=[3])
    assert isinstance(engine, RolloutEngine)
    before = engine.generate(PROMPTS, 1, params).completion_ids
    engine.sync(src.state_dict().items())
    want = LocalEngine(src, pad_token_id=PAD, eos_token_ids=[3]).generate(PROMPTS, 1, params).completion_ids
    got = engine.generate(PROMPTS, 1, params).completion_ids
    assert torch.equal(got, want) and not torch.equal(before, want)
    a.train()
    engine.generate(PROMPTS, 1, params)
    assert a.training


def test_unsupported_models_and_bad_arguments():
    assert direct_unsupported_reason(tiny_qwen2()) is None
    assert "GPT2LMHeadModel" in direct_unsupported_reason(tiny_gpt2())
    with pytest.raises(ValueError, match="direct"):
        LocalEngine(tiny_gpt2(), pad_token_id=PAD, eos_token_ids=[3], backend="direct")
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(top_k=-1), dict(top_k=2.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    engine = LocalEngine(tiny_qwen2(), pad_token_id=PAD, eos_token_ids=[3])
    with pytest.raises(ValueError):
        engine.generate([[1, 2], []], 1, SamplingParams())
    with pytest.raises(ValueError):
        engine.generate(PROMPTS, 0, SamplingParams())


def test_row_uniforms_are_uniform_and_depend_on_key_and_step_only():
    from gradus.rollout.sampling import row_uniforms

    keys = torch.arange(200_000, dtype=torch.long) * 7919 - 10**12
    u = row_uniforms(keys, 3)
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    # chi-square over 100 equal bins: 99 degrees of freedom, mean 99, sd 14; 200 is ~7 sd out
    counts = torch.histc(u, bins=100, min=0.0, max=1.0)
    expected = len(u) / 100
    assert ((counts - expected) ** 2 / expected).sum() < 200
    # the same (key, step) gives the same number whatever the batch around it; another step another one
    assert torch.equal(row_uniforms(keys[[5, 2]], 3), u[[5, 2]])
    assert (row_uniforms(keys[:1000], 4) != u[:1000]).float().mean() > 0.999
    # consecutive keys and steps are not correlated
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01


@pytest.mark.parametrize("backend", ["direct", "hf"])
def test_sampling_is_batch_invariant(backend):
    # A completion depends on (prompt key, sample index) alone: alone, in another batch, in another order.
    engine = LocalEngine(tiny_qwen2(), pad_token_id=PAD, eos_token_ids=[3], backend=backend)
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    keys = [101, 202, 303, 404]
    full = engine.generate(PROMPTS, 3, params, seeds=keys)
    alone = engine.generate(PROMPTS[2:3], 3, params, seeds=keys[2:3])
    reversed_ = engine.generate(PROMPTS[::-1], 3, params, seeds=keys[::-1])
    for j in range(len(PROMPTS)):
        rows = slice(3 * j, 3 * j + 3)
        back = slice(3 * (3 - j), 3 * (3 - j) + 3)
        n = int(full.lengths[rows].max())
        assert torch.equal(full.completion_ids[rows, :n], reversed_.completion_ids[back, :n])
    n = int(alone.lengths.max())
    assert torch.equal(full.completion_ids[6:9, :n], alone.completion_ids[:, :n])
    assert not torch.equal(full.completion_ids[0], full.completion_ids[1])  # samples of a group differ
    other = engine.generate(PROMPTS, 3, params, seeds=[k + 1 for k in keys])
    assert not torch.equal(other.completion_ids, full.completion_ids)
