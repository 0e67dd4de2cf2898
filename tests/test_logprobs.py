"""Chunked log-probs against the plain log_softmax + gather, in values, gradients and memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gradus.logprobs import completion_logprobs, position_ids_from_mask, token_logprobs
from gradus.models import build_char_tokenizer, build_tiny_model

N, H, V = 23, 8, 31  # 23 tokens: prime, so most chunk sizes leave a ragged last chunk


def naive_logprobs(hidden, weight, targets, temperature=1.0, bias=None):
    """The reference: full [N, V] logits, log_softmax, gather."""
    logits = hidden @ weight.T  # [N, V]
    if bias is not None:
        logits = logits + bias
    logp_all = (logits / temperature).log_softmax(dim=-1)  # [N, V]
    return logp_all.gather(-1, targets[..., None]).squeeze(-1)  # [N]


def make_inputs(dtype=torch.float32, seed=0, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    bias = bias if with_bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen, dtype=torch.float64)  # per-token weights of the "loss"
    return hidden, weight, bias, targets, upstream


def grads(output, upstream, *tensors):
    return torch.autograd.grad((output * upstream.to(output.dtype)).sum(), tensors)


def test_position_ids_from_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask), expected)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, N, N + 9, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_naive_values_and_grads(chunk_size, temperature):
    hidden, weight, bias, targets, upstream = make_inputs()
    ours = token_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size, bias=bias)
    ref = naive_logprobs(hidden, weight, targets, temperature, bias)
    assert ours.shape == (N,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    got = grads(ours, upstream, hidden, weight, bias)
    want = grads(ref, upstream, hidden, weight, bias)
    # The same maths in float64 is the truth both fp32 paths are judged against.
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    truth = grads(naive_logprobs(h64, w64, targets, temperature, b64), upstream, h64, w64, b64)
    for g, w, t in zip(got, want, truth, strict=True):
        # These gradients are O(10) (max |g| 5..15 here), so fp32 rounding alone is a few 1e-6 absolute;
        # chunked accumulation orders sums differently from the naive path, hence atol 1e-5, not 1e-6.
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        # Tighter, relative to the gradient's scale: within ~8 float32 ulps of the largest entry.
        assert (g.double() - t).abs().max() <= 1e-6 * t.abs().max()


def test_no_bias_and_batched_shape():
    hidden, weight, _, targets, upstream = make_inputs(with_bias=False)
    hidden_3d = hidden[:22].reshape(2, 11, H)  # [B, T, H]
    targets_2d = targets[:22].reshape(2, 11)  # [B, T]
    ours = token_logprobs(hidden_3d, weight, targets_2d, chunk_size=5)
    ref = naive_logprobs(hidden_3d, weight, targets_2d)
    assert ours.shape == (2, 11)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    up = upstream[:22].reshape(2, 11)
    for got, want in zip(grads(ours, up, hidden, weight), grads(ref, up, hidden, weight), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_weight_gets_no_grad_and_hidden_grad_still_exact():
    hidden, weight, _, targets, upstream = make_inputs(with_bias=False)
    frozen = weight.detach()
    (got,) = grads(token_logprobs(hidden, frozen, targets, chunk_size=6), upstream, hidden)
    (want,) = grads(naive_logprobs(hidden, frozen, targets), upstream, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_entropy_equals_naive_entropy_and_is_detached():
    hidden, weight, bias, targets, _ = make_inputs()
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=0.8, chunk_size=5, bias=bias,
                                   with_entropy=True)
    logp_all = ((hidden @ weight.T + bias) / 0.8).log_softmax(-1)  # [N, V]
    want = -(logp_all.exp() * logp_all).sum(-1)  # [N]
    torch.testing.assert_close(entropy, want.detach(), rtol=1e-6, atol=1e-5)
    assert not entropy.requires_grad
    torch.testing.assert_close(logp, naive_logprobs(hidden, weight, targets, 0.8, bias), rtol=1e-6, atol=1e-5)


def test_uniform_distribution_by_hand():
    # Zero hidden states -> all logits 0 -> p = 1/V for every token, entropy log V.
    hidden = torch.zeros(3, H)
    weight = torch.randn(V, H)
    logp, entropy = token_logprobs(hidden, weight, torch.tensor([0, 5, 30]), with_entropy=True)
    torch.testing.assert_close(logp, torch.full((3,), -torch.log(torch.tensor(float(V)))))
    torch.testing.assert_close(entropy, torch.full((3,), torch.log(torch.tensor(float(V)))))


def test_bf16_inputs_compute_in_fp32():
    hidden, weight, bias, targets, upstream = make_inputs(dtype=torch.bfloat16)
    ours = token_logprobs(hidden, weight, targets, chunk_size=4, bias=bias)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    # Same bf16 values, upcast: the fp32 computation must agree to fp32 precision, not bf16 precision.
    up_h, up_w, up_b = (t.detach().float().requires_grad_() for t in (hidden, weight, bias))
    ref = naive_logprobs(up_h, up_w, targets, 1.0, up_b)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    got = grads(ours, upstream, hidden, weight, bias)
    want = grads(ref, upstream, up_h, up_w, up_b)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), w, rtol=1e-2, atol=1e-2)  # bf16 rounding of the result only


def test_gradcheck_float64():
    hidden, weight, bias, targets, _ = make_inputs(dtype=torch.float64)
    hidden, weight, bias = (t.detach()[:7].requires_grad_() if t is hidden else t.detach().requires_grad_()
                            for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: token_logprobs(h, w, targets[:7], temperature=0.6, chunk_size=3, bias=b),
        (hidden, weight, bias),
    )


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (a proxy for peak memory that is exact on CPU)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def test_largest_buffer_grows_with_chunk_not_tokens():
    n_tokens, vocab, chunk = 64, 500, 8
    hidden = torch.randn(n_tokens, H, requires_grad=True)
    weight = torch.randn(vocab, H, requires_grad=True)
    targets = torch.randint(0, vocab, (n_tokens,))
    with _LargestTensor() as chunked:
        token_logprobs(hidden, weight, targets, chunk_size=chunk).sum().backward()
    with _LargestTensor() as naive:
        naive_logprobs(hidden, weight, targets).sum().backward()
    assert naive.largest == n_tokens * vocab  # the mode does see the [N, V] tensors
    assert chunked.largest == max(chunk * vocab, vocab * H)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("nano", tokenizer=tokenizer, seed=3)
    prompts = ["1+1=", "12+30=", "7*8="]
    completions = ["2</s><pad>", "42</s>", "56</s><pad>"]  # right padding after eos
    left = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    right = tokenizer(completions, padding=True, return_tensors="pt")
    comp_mask = (right.input_ids != tokenizer.pad_token_id).long()  # [B, L]
    input_ids = torch.cat([left.input_ids, right.input_ids], dim=1)  # [B, S]
    attention_mask = torch.cat([left.attention_mask, comp_mask], dim=1)  # [B, S]
    return model, tokenizer, input_ids, attention_mask, left.input_ids.shape[1]


def naive_completion_logprobs(model, input_ids, attention_mask, start, temperature=1.0):
    logits = model(input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask)).logits.float()  # [B, S, V]
    logp_all = (logits[:, start - 1 : -1] / temperature).log_softmax(-1)  # [B, L, V]
    return logp_all.gather(-1, input_ids[:, start:, None]).squeeze(-1)  # [B, L]


def test_completion_logprobs_match_full_forward_values_and_param_grads(tiny):
    model, _, input_ids, attention_mask, start = tiny
    assert (attention_mask[:, 0] == 0).any(), "the batch must contain a left-padded prompt"
    ours = completion_logprobs(model, input_ids, attention_mask, start, temperature=0.9, chunk_size=5)
    ref = naive_completion_logprobs(model, input_ids, attention_mask, start, temperature=0.9)
    assert ours.shape == (3, input_ids.shape[1] - start) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)) * attention_mask[:, start:]
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((ours * upstream).sum(), params)
    want = torch.autograd.grad((ref * upstream).sum(), params)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_left_padding_is_invisible(tiny):
    # The position-id convention makes a padded row score exactly like the same row without padding.
    model, _, input_ids, attention_mask, start = tiny
    batched = completion_logprobs(model, input_ids, attention_mask, start)
    for row in range(input_ids.shape[0]):
        n_pad = int((attention_mask[row, :start] == 0).sum())
        alone = completion_logprobs(model, input_ids[row:row + 1, n_pad:],
                                    attention_mask[row:row + 1, n_pad:], start - n_pad)
        real = attention_mask[row, start:].bool()
        torch.testing.assert_close(batched[row][real], alone[0][real], rtol=1e-5, atol=1e-5)


def test_completion_entropy_matches_full_forward(tiny):
    model, _, input_ids, attention_mask, start = tiny
    with torch.no_grad():
        _, entropy = completion_logprobs(model, input_ids, attention_mask, start, with_entropy=True)
        logits = model(input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).logits[:, start - 1 : -1]
        logp_all = logits.float().log_softmax(-1)  # [B, L, V]
    torch.testing.assert_close(entropy, -(logp_all.exp() * logp_all).sum(-1), rtol=1e-5, atol=1e-5)


def test_completion_logprobs_call_the_module_so_its_hooks_fire(tiny):
    # Wrappers (DDP, FSDP2, PEFT) work through hooks and module calls; a hook that changes a layer's
    # output must change the log-probs exactly as it changes the full forward's, and the model's own
    # forward pre-hook must see the call. The head never computes [B, S, V] logits.
    model, _, input_ids, attention_mask, start = tiny
    calls, head_outputs = [], []
    def seen(module, args, kwargs):
        calls.append(kwargs.get("input_ids", args[0] if args else None).shape)

    handles = [model.register_forward_pre_hook(seen, with_kwargs=True),
               model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: out * 1.5),
               model.lm_head.register_forward_hook(lambda m, a, out: head_outputs.append(a[0].shape))]
    try:
        ours = completion_logprobs(model, input_ids, attention_mask, start)
        ref = naive_completion_logprobs(model, input_ids, attention_mask, start)
    finally:
        for h in handles:
            h.remove()
    plain = completion_logprobs(model, input_ids, attention_mask, start)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the hook mattered
    assert calls[0] == input_ids.shape
    assert head_outputs[0][1] == 0  # our call: the head got an empty slice of positions


def test_completion_logprobs_rejects_softcapping_and_bad_start(tiny):
    model, _, input_ids, attention_mask, _ = tiny
    with pytest.raises(ValueError, match="completion_start"):
        completion_logprobs(model, input_ids, attention_mask, 0)
    with pytest.raises(ValueError, match="completion_start"):
        completion_logprobs(model, input_ids, attention_mask, input_ids.shape[1])
    capped = build_tiny_model("nano", tokenizer=build_char_tokenizer())
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        completion_logprobs(capped, input_ids, attention_mask, 3)


def test_bad_arguments_raise():
    hidden, weight, _, targets, _ = make_inputs(with_bias=False)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, weight[:, :-1], targets)
