"""RolloutBatch.routed_experts: what LocalEngine records on MoE models (against one full-sequence forward
of the sampled tokens), that dense models are left alone, and that every batch transform carries it."""

from __future__ import annotations

import pytest
import torch

from gradus.logprobs import position_ids_from_mask
from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.models.routing import capture, moe_layout
from gradus.rollout import LocalEngine, RolloutBatch, SamplingParams
from gradus.rollout import local as local_mod
from gradus.rollout.decoders import HFDecoder

TOKENIZER = build_char_tokenizer()
PAD = TOKENIZER.pad_token_id
# three prompt lengths: rows of the shorter prompts are left-padded
PROMPTS = [[5, 40, 41], [60, 61, 62, 63, 64, 65, 66, 67], [70, 71, 72, 73, 74]]
# The tiny models sample nearly uniformly over 260 ids: with 30 of them ending a row, about one row
# in nine ends per step, so rows end (and are dropped) at different steps and some reach the limit.
EOS = list(range(100, 130))
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=12)


class CountingDecoder(HFDecoder):
    """HFDecoder that remembers how many rows each `keep` left: proof that rows were dropped mid-way."""

    kept: list[int] = []

    def keep(self, rows: torch.Tensor) -> None:
        CountingDecoder.kept.append(rows.numel())
        super().keep(rows)


def full_forward_routing(model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of ONE training-style forward over prompt + completion: experts [B, P+T, L, k], and
    the gap between each token's k-th and (k+1)-th router logit [B, P+T, L] (small = a near-tie)."""
    mask = batch.attention_mask  # [B, P+T]
    logits = []  # per layer [B*(P+T), E]
    hooks = [router.register_forward_hook(lambda module, args, out: logits.append(out[0]))
             for router in moe_layout(model).routers]
    with torch.no_grad(), capture(model) as record:
        model(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
              use_cache=False)
    for hook in hooks:
        hook.remove()
    (full,) = record.forwards
    k = full.shape[-1]
    ranked = torch.stack(logits, dim=1).sort(dim=-1, descending=True).values  # [B*(P+T), L, E]
    gap = (ranked[..., k - 1] - ranked[..., k]).view(full.shape[:3])  # [B, P+T, L]
    return full, gap


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_routed_experts_equal_one_full_forward_of_the_sampled_tokens(arch, monkeypatch):
    monkeypatch.setattr(local_mod, "HFDecoder", CountingDecoder)
    monkeypatch.setattr(CountingDecoder, "kept", [])
    model = build_tiny_model("micro", tokenizer=TOKENIZER, arch=arch, seed=0).eval()  # float32
    n = 3
    batch = LocalEngine(model, pad_token_id=PAD, eos_token_ids=EOS).generate(PROMPTS, n, PARAMS, seed=7)
    B, S = batch.input_ids.shape
    # the case holds what it must exercise: left padding, rows ended by EOS and by the limit, drops
    assert (batch.prompt_mask == 0).any()
    assert batch.truncated.any() and (~batch.truncated).any()
    assert CountingDecoder.kept and min(CountingDecoder.kept) < B

    routed = batch.routed_experts
    assert routed.shape == (B, S, 4, 2) and routed.dtype == torch.long and not routed.is_inference()
    full, gap = full_forward_routing(model, batch)  # [B, S, L, k], [B, S, L]
    last = batch.completion_start + batch.lengths - 1  # [B] column of each row's last token
    known = batch.attention_mask.bool()  # [B, S]
    known[torch.arange(B), last] = False  # never fed back during the rollout
    # no near-tie among the compared tokens (the closest is ~4e-4, fp32 rounding is ~1e-6): decoding
    # with a KV cache and the full forward round differently, but cannot flip a choice here
    assert gap[known].min() > 1e-4
    # top-k sets: the router orders by probability, a full forward may order near-equal pairs otherwise
    assert torch.equal(routed[known].sort(-1).values, full[known].sort(-1).values)
    assert (routed[~known] == -1).all()
    # the n completions of a prompt share its prefill, hence its prompt routing; their completions differ
    prompt, completion = batch.routing_parts()
    assert torch.equal(prompt[0::n], prompt[1::n]) and torch.equal(prompt[0::n], prompt[2::n])
    assert not torch.equal(completion[0], completion[1])


def test_recording_changes_no_sampled_token(monkeypatch):
    model = build_tiny_model("micro", tokenizer=TOKENIZER, arch="mixtral", seed=0).eval()
    recorded = LocalEngine(model, pad_token_id=PAD, eos_token_ids=EOS).generate(PROMPTS, 2, PARAMS, seed=3)

    monkeypatch.setattr(local_mod, "moe_layout_or_none", lambda model: None)  # as if the model were dense
    plain = LocalEngine(model, pad_token_id=PAD, eos_token_ids=EOS).generate(PROMPTS, 2, PARAMS, seed=3)
    assert plain.routed_experts is None and recorded.routed_experts is not None
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampling_logp", "lengths"):
        assert torch.equal(getattr(recorded, name), getattr(plain, name)), name


def test_dense_model_gets_no_routing_and_no_hooks(monkeypatch):
    model = build_tiny_model("nano", tokenizer=TOKENIZER, arch="qwen2", seed=0).eval()
    layouts = []
    monkeypatch.setattr(local_mod, "moe_layout_or_none",
                        lambda m, real=local_mod.moe_layout_or_none: layouts.append(m) or real(m))
    engine = LocalEngine(model, pad_token_id=PAD, eos_token_ids=EOS)
    assert engine.uses_direct()  # a hook on any module would have sent it to the slow path
    hooks = []
    for register in ("register_forward_hook", "register_forward_pre_hook"):
        original = getattr(torch.nn.Module, register)
        monkeypatch.setattr(torch.nn.Module, register,
                            lambda self, *a, original=original, **kw: hooks.append(self) or original(self, *a, **kw))
    first = engine.generate(PROMPTS, 3, PARAMS, seed=7)
    second = engine.generate(PROMPTS, 3, PARAMS, seed=7)
    assert first.routed_experts is None and hooks == []
    assert len(layouts) == 1  # looked up once per engine, not per call
    assert torch.equal(first.completion_ids, second.completion_ids)


# ---- transforms, on a hand-built batch -----------------------------------------------------------

def hand_batch(prompt_lens: list[int], lengths: list[int], P: int, T: int, *, routed: bool = True,
               first_id: int = 0) -> RolloutBatch:
    """Rows with the given real prompt and completion lengths; each real (token, layer, slot) of
    routed_experts holds its own number (L = 2, k = 2), so any misplaced column shows; -1 at padding."""
    B = len(lengths)
    prompt_mask = torch.tensor([[0] * (P - p) + [1] * p for p in prompt_lens])  # [B, P]
    completion_mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()  # [B, T]
    mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
    numbers = first_id + torch.arange(B * (P + T) * 4).view(B, P + T, 2, 2)  # [B, P+T, L, k]
    return RolloutBatch(
        prompt_ids=(10 + torch.arange(B * P).view(B, P)) * prompt_mask,  # [B, P]
        prompt_mask=prompt_mask,
        completion_ids=(20 + torch.arange(B * T).view(B, T)) * completion_mask,  # [B, T]
        completion_mask=completion_mask,
        sampling_logp=-0.5 * completion_mask.float(),  # [B, T]
        lengths=torch.tensor(lengths),
        truncated=torch.tensor(lengths) == T,
        prompt_index=torch.arange(B),
        routed_experts=numbers.masked_fill(mask[:, :, None, None] == 0, -1) if routed else None,
    )


def real_routing(b: RolloutBatch) -> torch.Tensor:
    """Routing of the real tokens, in row-major order: [tokens, L, k]; a layout-free view to compare."""
    return b.routed_experts[b.attention_mask.bool()]


FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampling_logp", "lengths",
          "truncated", "prompt_index", "routed_experts")


def test_trim_and_select_carry_routed_experts():
    # P = 6 but at most 4 real prompt tokens: trim drops 2 prompt columns; T = 5, at most 3 real: drops 2
    b = hand_batch([2, 4, 3, 1], [1, 3, 2, 1], P=6, T=5)
    t = b.trim()
    assert t.routed_experts.shape == (4, 4 + 3, 2, 2)
    assert torch.equal(real_routing(t), real_routing(b))
    assert (t.routed_experts[~t.attention_mask.bool()] == -1).all()
    prompt, completion = t.routing_parts()
    assert torch.equal(prompt, b.routed_experts[:, 2:6]) and torch.equal(completion, b.routed_experts[:, 6:9])
    s = b.select([2, 0])
    assert torch.equal(s.routed_experts, b.routed_experts[[2, 0]])
    assert torch.equal(b.select(torch.tensor([False, True, False, True])).routed_experts, b.routed_experts[[1, 3]])


def test_concat_re_pads_routed_experts_with_minus_one():
    b = hand_batch([2, 4, 3, 1], [1, 3, 2, 1], P=6, T=5)
    # parts of different widths: [2, 1] prompts and [1, 1] completions vs [4, 3] and [3, 2]
    parts = [b.select([0, 3]).trim(), b.select([1, 2]).trim()]
    assert parts[0].routed_experts.shape[1] == 2 + 1 and parts[1].routed_experts.shape[1] == 4 + 3
    joined = RolloutBatch.concat(parts)
    want = b.trim().select([0, 3, 1, 2])
    for name in FIELDS:
        assert torch.equal(getattr(joined, name), getattr(want, name)), name
    assert (joined.routed_experts[~joined.attention_mask.bool()] == -1).all()


def test_optional_routing_through_to_clone_and_mixing():
    b = hand_batch([2, 4], [1, 3], P=4, T=3)
    moved = b.to("cpu")
    assert torch.equal(moved.routed_experts, b.routed_experts)
    copy = b.clone()
    copy.routed_experts[0, -1] = 7
    assert torch.equal(copy.routed_experts[1], b.routed_experts[1]) and (b.routed_experts[0, -1] == -1).all()
    plain = hand_batch([2, 4], [1, 3], P=4, T=3, routed=False)
    for out in (plain.to("cpu"), plain.clone(), plain.select([1]), plain.trim(), RolloutBatch.concat([plain, plain])):
        assert out.routed_experts is None
    assert plain.routing_parts() is None
    with pytest.raises(ValueError, match="1 of 2 batches have routed_experts"):
        RolloutBatch.concat([b, plain])
    with pytest.raises(ValueError, match="1 of 2 batches have routed_experts"):
        RolloutBatch.concat([plain, b])
    with pytest.raises(ValueError, match=r"int64 \[B, P\+T, L, k\] with \[B, P\+T\] = \[2, 7\]"):
        RolloutBatch(**{**b._tensors(), "routed_experts": b.routed_experts[:, 1:]})
