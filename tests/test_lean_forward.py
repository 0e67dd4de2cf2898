"""gradus.models.lean: the lean Qwen2/Llama forward against the HF decoder it stands in for.

The oracle is the stock HF forward of the same module (`decoder(...).last_hidden_state`, SDPA attention,
the mask HF builds): hidden states and the gradients of every parameter must agree. On CPU they agree
bitwise in float32 and float64 (same ops, same order); the tolerances below allow for other kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

import gradus.models.lean as lean
from gradus.logprobs import completion_logprobs, position_ids_from_mask
from gradus.models import build_char_tokenizer, build_critic, build_tiny_model, critic_values
from gradus.models.lean import decoder_hidden, hf_forward_forced, lean_hidden, unsupported_reason

F32 = {"rtol": 1e-5, "atol": 1e-6}
F64 = {"rtol": 1e-12, "atol": 1e-13}
# Gradients are sums over tokens with cancellation, so a float32 element far below its tensor's largest
# can carry a large relative error from a different summation order (the closed-form RMSNorm backward,
# the fused q/k/v and gate/up matmuls). They are compared relative to the tensor's scale: max |diff| <=
# GRAD_F32 * max |expected| (seen: ~2e-7). Float64 gradients are compared elementwise with F64.
GRAD_F32 = 1e-5
VOCAB = 50


def tiny_decoder(arch: str, kv_heads: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, **extra):
    """A 2-layer decoder with non-trivial norm weights and biases (HF initialises them to 1 and 0)."""
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2Model), "llama": (LlamaConfig, LlamaModel)}[arch]
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                        pad_token_id=0, **extra)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.3 * torch.randn_like(param))  # so a swapped weight/bias would show
    return model.to(dtype)


def make_batch(padding: str, rows: int = 4, seq_len: int = 10, seed: int = 1):
    """ids [B, S] and mask [B, S] (1 = token) with left, right, both or no padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, seq_len), generator=generator)  # [B, S]
    mask = torch.ones(rows, seq_len, dtype=torch.long)  # [B, S]
    if padding in ("left", "both"):
        mask[0, :3] = 0
        mask[2, :1] = 0
    if padding in ("right", "both"):
        mask[1, -4:] = 0
        mask[2, -2:] = 0
    input_ids[mask == 0] = 0
    return input_ids, mask


def hf_hidden(decoder, input_ids, mask):
    return decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).last_hidden_state  # [B, S, H]


CASES = [("qwen2", 2), ("qwen2", 4), ("llama", 2), ("llama", 1)]


@pytest.mark.parametrize("padding", ["none", "left", "right", "both"])
@pytest.mark.parametrize(("arch", "kv_heads"), CASES)
def test_hidden_matches_hf(arch, kv_heads, padding):
    decoder = tiny_decoder(arch, kv_heads)
    assert unsupported_reason(decoder) is None
    input_ids, mask = make_batch(padding)
    expected = hf_hidden(decoder, input_ids, mask)
    got = lean_hidden(decoder, input_ids, mask, position_ids_from_mask(mask))
    assert got.shape == expected.shape == (4, 10, 32)
    torch.testing.assert_close(got, expected, **F32)  # every position, padded ones included


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hidden_matches_hf_float64(arch):
    decoder = tiny_decoder(arch, dtype=torch.float64)
    input_ids, mask = make_batch("both")
    expected = hf_hidden(decoder, input_ids, mask)
    got = lean_hidden(decoder, input_ids, mask, position_ids_from_mask(mask))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, **F64)


def assert_grad_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Elementwise F64 in float64; in float32 within GRAD_F32 of the tensor's largest element."""
    if expected.dtype == torch.float64:
        torch.testing.assert_close(got, expected, **F64, msg=name)
    else:
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0.0, atol=GRAD_F32 * scale, msg=name)


def parameter_grads(decoder, hidden_fn, input_ids, mask, weights):
    decoder.zero_grad(set_to_none=True)
    (hidden_fn(decoder, input_ids, mask) * weights).sum().backward()
    return {name: param.grad.clone() for name, param in decoder.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("arch", "kv_heads", "padding"),
                         [("qwen2", 2, "both"), ("llama", 2, "left"), ("llama", 4, "none")])
def test_parameter_grads_match_hf(arch, kv_heads, padding, dtype):
    decoder = tiny_decoder(arch, kv_heads, dtype=dtype).train()
    input_ids, mask = make_batch(padding)
    weights = torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(5), dtype=dtype)  # [B, S, H]
    expected = parameter_grads(decoder, hf_hidden, input_ids, mask, weights)
    got = parameter_grads(
        decoder, lambda d, i, m: lean_hidden(d, i, m, position_ids_from_mask(m)), input_ids, mask, weights)
    assert got.keys() == expected.keys()
    # embeddings + final norm + per layer q/k/v/o, gate/up/down, 2 norms, and q/k/v biases in Qwen2
    assert len(got) == 2 + 2 * (9 + (3 if arch == "qwen2" else 0))
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name  # every parameter gets a gradient, so each comparison means something
        assert_grad_close(got[name], grad, name)


def test_rms_norm_backward_is_the_derivative():
    """The closed-form backward of the float32 RMSNorm against finite differences (run in float64)."""
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: lean._RMSNorm32.apply(a, w, 1e-6), (x, weight))


def test_bfloat16_close_to_hf():
    """bf16: same casts as HF, so close; the tolerance is a few bf16 ulps (2^-8 relative) of values ~1-3."""
    decoder = tiny_decoder("qwen2", dtype=torch.bfloat16)
    input_ids, mask = make_batch("both")
    expected = hf_hidden(decoder, input_ids, mask).float()
    got = lean_hidden(decoder, input_ids, mask, position_ids_from_mask(mask))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


class WrappedLinear(nn.Linear):
    """Stands for an adapter (LoRA) or quantised layer: a Linear subclass that computes something else."""


def _changed(change):
    """A tiny Qwen2 decoder with one change applied (the change may return None or anything)."""
    decoder = tiny_decoder("qwen2")
    change(decoder)
    return decoder


UNSUPPORTED = [
    (lambda: tiny_decoder("qwen2", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type"),
    (lambda: tiny_decoder("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1), "sliding"),
    (lambda: _changed(lambda d: d.config.__setattr__("hidden_act", "gelu")), "hidden_act"),
    (lambda: tiny_decoder("qwen2", attention_dropout=0.1).train(), "attention_dropout"),
    (lambda: _changed(lambda d: d.activation_checkpointing_enable()), "gradient checkpointing"),
    (lambda: _changed(lambda d: d.layers[1].self_attn.__setattr__("q_proj", WrappedLinear(32, 32))),
     "plain nn.Linear"),
    (lambda: _changed(lambda d: d.config.__setattr__("model_type", "mistral")), "model_type"),
]


@pytest.mark.parametrize(("make", "reason_part"), UNSUPPORTED)
def test_unsupported_decoders_fall_back_to_hf(make, reason_part, monkeypatch):
    decoder = make()
    reason = unsupported_reason(decoder)
    assert reason is not None and reason_part in reason
    monkeypatch.setattr(lean, "lean_hidden", lambda *a: pytest.fail("lean path taken for an unsupported model"))
    input_ids, mask = make_batch("left")
    with torch.no_grad():  # dropout in train mode: compare under one seed
        torch.manual_seed(0)
        got = decoder_hidden(decoder, input_ids, mask, position_ids_from_mask(mask))
        torch.manual_seed(0)
        expected = hf_hidden(decoder, input_ids, mask)
    assert torch.equal(got, expected)


def test_attention_dropout_is_fine_in_eval():
    decoder = tiny_decoder("llama", attention_dropout=0.1).eval()
    assert unsupported_reason(decoder) is None


def test_switch_forces_hf(monkeypatch):
    decoder = tiny_decoder("llama")
    calls = []
    real = lean.lean_hidden
    monkeypatch.setattr(lean, "lean_hidden", lambda *a: calls.append(1) or real(*a))
    input_ids, mask = make_batch("right")
    positions = position_ids_from_mask(mask)
    decoder_hidden(decoder, input_ids, mask, positions)
    assert calls == [1]
    with hf_forward_forced():
        decoder_hidden(decoder, input_ids, mask, positions)
    assert calls == [1] and lean.LEAN_ENABLED
    decoder_hidden(decoder, input_ids, mask, positions)
    assert calls == [1, 1]


@pytest.fixture(scope="module")
def tiny_policy():
    return build_tiny_model("nano", tokenizer=build_char_tokenizer(), arch="qwen2", seed=3)


def test_completion_logprobs_and_grads_match_hf_path(tiny_policy, monkeypatch):
    input_ids, mask = make_batch("both", rows=4, seq_len=12)
    calls = []
    real = lean.lean_hidden
    monkeypatch.setattr(lean, "lean_hidden", lambda *a: calls.append(1) or real(*a))

    def run():
        tiny_policy.zero_grad(set_to_none=True)
        logp = completion_logprobs(tiny_policy, input_ids, mask, 5)  # [B, 7]
        (logp * mask[:, 5:]).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in tiny_policy.named_parameters()}

    logp, grads = run()
    assert calls == [1]  # the lean path ran
    with hf_forward_forced():
        expected_logp, expected_grads = run()
    assert calls == [1]
    torch.testing.assert_close(logp, expected_logp, **F32)
    for name, grad in expected_grads.items():
        assert_grad_close(grads[name], grad, name)


def test_critic_values_match_hf_path(tiny_policy):
    critic = build_critic(tiny_policy)
    with torch.no_grad():
        critic.score.weight.normal_()  # a zero head would make every value 0 on both paths
    input_ids, mask = make_batch("left", rows=3, seq_len=9)
    values = critic_values(critic, input_ids, mask)  # [B, S]
    with hf_forward_forced():
        expected = critic_values(critic, input_ids, mask)
    assert values.shape == (3, 9)
    torch.testing.assert_close(values, expected, **F32)
