"""Routing capture and replay (models/routing.py) on the built-in tiny MoE models, against a by-hand
router, the plain forward, and incremental decoding with a KV cache (HFDecoder)."""

from __future__ import annotations

import pytest
import torch

from gradus.logprobs import position_ids_from_mask
from gradus.models import build_char_tokenizer, build_tiny_model, tiny_config
from gradus.models.routing import capture, moe_layout, replay, routing_mismatch
from gradus.models.tiny import MOE_ARCHS, MOE_AUX_LOSS_COEF, MOE_NUM_EXPERTS, MOE_TOP_K, TINY_SIZES
from gradus.rollout.decoders import HFDecoder
from gradus.rollout.local import left_pad

TOKENIZER = build_char_tokenizer()
PAD = TOKENIZER.pad_token_id
# two rows of different lengths: the first is left-padded by 3 columns
PROMPTS = [[5, 40, 41, 77, 9], [60, 61, 62, 63, 64, 65, 66, 67]]


def tiny_moe(arch: str, seed: int = 0) -> torch.nn.Module:
    return build_tiny_model("nano", tokenizer=TOKENIZER, arch=arch, seed=seed).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_pad(PROMPTS, PAD, torch.device("cpu"))  # [2, 8]
    return ids, mask


def forward(model, ids, mask) -> torch.Tensor:
    """The trainer's call: the module itself, gradus position ids, no cache. -> logits [B, S, V]"""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=False).logits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_tiny_moe_configs(arch):
    config = tiny_config("micro", tokenizer=TOKENIZER, arch=arch)
    assert config.model_type == arch and config.num_experts_per_tok == MOE_TOP_K == 2
    assert config.num_experts == MOE_NUM_EXPERTS == 4  # Mixtral maps num_experts -> num_local_experts
    assert config.router_aux_loss_coef == MOE_AUX_LOSS_COEF > 0 and config.output_router_logits is False
    spec = TINY_SIZES["micro"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 4, 4)
    assert config.hidden_size // config.num_attention_heads == 32 and config.vocab_size == len(TOKENIZER)
    width = config.intermediate_size if arch == "mixtral" else config.moe_intermediate_size
    assert width == spec.intermediate_size // 2
    with torch.device("meta"):
        model = build_tiny_model("micro", tokenizer=TOKENIZER, arch=arch)
    layout = moe_layout(model)
    assert layout.num_layers == 4 and layout.top_k == 2 and layout.num_experts == 4
    assert layout.names[0] == "model.layers.0.mlp.gate"
    assert 1.2e6 < sum(p.numel() for p in model.parameters()) < 1.8e6


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_capture_equals_router_topk_by_hand(arch):
    model = tiny_moe(arch)
    layout = moe_layout(model)
    ids, mask = batch()
    B, S = ids.shape
    block_inputs = []  # per layer, what the MoE block saw: [B, S, H]
    hooks = [block.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0].detach()))
             for block in layout.blocks]
    with torch.no_grad(), capture(model) as record:
        forward(model, ids, mask)
    for hook in hooks:
        hook.remove()
    (got,) = record.forwards
    assert got.shape == (B, S, layout.num_layers, 2) and got.dtype == torch.long
    for layer, (router, x) in enumerate(zip(layout.routers, block_inputs, strict=True)):
        weight = router.weight.detach().double()  # [E, H]
        for b in range(B):
            for s in range(S):
                if not mask[b, s]:  # padding: the pad embedding is 0, all logits tie at 0, any order is right
                    continue
                # softmax is monotone, so the top-k of the probabilities is the top-k of the logits
                scores = [float(weight[e] @ x[b, s].double()) for e in range(layout.num_experts)]
                top = sorted(range(layout.num_experts), key=lambda e: -scores[e])[:2]
                assert got[b, s, layer].tolist() == top, (layer, b, s, scores)
    assert record.experts().shape == got.shape


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_replay_of_capture_is_identity_and_other_routing_is_forced(arch):
    model = tiny_moe(arch)
    ids, mask = batch()
    with torch.no_grad():
        with capture(model) as record:
            plain = forward(model, ids, mask)  # [B, S, V]
        (own,) = record.forwards  # [B, S, L, k]
        with replay(model, own):
            assert torch.equal(forward(model, ids, mask), plain)  # same experts, same weights: bit for bit
        # unforced rows (all -1) keep the router's own choice
        with replay(model, torch.full_like(own, -1)):
            assert torch.equal(forward(model, ids, mask), plain)
        shifted = (own + 1) % MOE_NUM_EXPERTS  # every (token, layer) gets a different set
        with replay(model, shifted), capture(model) as inner:  # capture entered after replay
            moved = forward(model, ids, mask)
        with capture(model) as outer, replay(model, shifted):  # and before
            again = forward(model, ids, mask)
    assert torch.equal(inner.forwards[0], shifted) and torch.equal(outer.forwards[0], shifted)
    assert torch.equal(moved, again)
    assert (moved - plain).abs().amax() > 1e-3
    # with the hooks gone the model routes by itself again
    with torch.no_grad():
        assert torch.equal(forward(model, ids, mask), plain)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_replayed_gate_weights_are_the_current_router_probabilities(arch):
    model = tiny_moe(arch)
    layout = moe_layout(model)
    ids, mask = batch()
    B, S = ids.shape
    with torch.no_grad(), capture(model) as record:
        forward(model, ids, mask)
    forced = (record.forwards[0] + 1) % MOE_NUM_EXPERTS  # [B, S, L, k]
    seen = []  # per layer, the experts module's inputs: (hidden [N, H], top_k_index [N, k], top_k_weights [N, k])
    hooks = [block.experts.register_forward_pre_hook(lambda m, args: seen.append([a.detach() for a in args]))
             for block in layout.blocks]
    with torch.no_grad(), replay(model, forced):
        forward(model, ids, mask)
    for hook in hooks:
        hook.remove()
    renormalises = arch != "qwen2_moe"  # the tiny qwen2_moe has norm_topk_prob=False, as Qwen1.5-MoE
    for layer, (router, (x, index, weights)) in enumerate(zip(layout.routers, seen, strict=True)):
        want_index = forced[:, :, layer].reshape(B * S, 2)  # batch-major token order
        assert torch.equal(index, want_index)
        probs = torch.softmax(x.double() @ router.weight.detach().double().T, dim=-1)  # [N, E], by hand
        want = probs.gather(1, want_index)  # [N, k]: the current router's probabilities of the forced experts
        if renormalises:
            want = want / want.sum(-1, keepdim=True)
        assert torch.allclose(weights.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_replay_of_capture_is_identity_in_bfloat16(arch):
    # Qwen routers cast the gate weights to the logits' dtype, Mixtral's keep them in float32: replay
    # must do the same for the bf16 forward to come out bit for bit.
    model = tiny_moe(arch).to(torch.bfloat16)
    ids, mask = batch()
    with torch.no_grad():
        with capture(model) as record:
            plain = forward(model, ids, mask)
        with replay(model, record.forwards[0]):
            assert torch.equal(forward(model, ids, mask), plain)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_capture_during_kv_cache_decoding_matches_full_forward(arch):
    model = tiny_moe(arch, seed=1)
    ids, mask = batch()
    steps = 5
    decoder = HFDecoder(model, steps)
    with torch.no_grad(), capture(model) as record:
        logits = decoder.prefill(ids, mask, repeats=1)  # [B, V]
        tokens = []
        for _ in range(steps):
            tokens.append(logits.argmax(-1))  # [B]
            logits = decoder.step(tokens[-1])
    shapes = [tuple(f.shape[:2]) for f in record.forwards]
    assert shapes == [(2, 8)] + [(2, 1)] * steps
    incremental = record.experts()  # [B, 8 + steps, L, k]
    full_ids = torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)  # [B, 8 + steps]
    full_mask = torch.cat([mask, torch.ones_like(full_ids[:, 8:])], dim=1)
    with torch.no_grad(), capture(model) as record:
        forward(model, full_ids, full_mask)
    (full,) = record.forwards
    real = full_mask.bool()  # padding columns route garbage in both; only real tokens are compared
    assert torch.equal(incremental[real].sort(-1).values, full[real].sort(-1).values)
    assert routing_mismatch(incremental, full, full_mask)["layer_mismatch_frac"] == 0


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_gets_gradient_under_replay(arch):
    model = tiny_moe(arch)
    layout = moe_layout(model)
    ids, mask = batch()
    with torch.no_grad(), capture(model) as record:
        forward(model, ids, mask)
    (own,) = record.forwards

    def router_grads(experts: torch.Tensor | None) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if experts is None:
            loss = forward(model, ids, mask).logsumexp(-1).mean()
        else:
            with replay(model, experts):
                loss = forward(model, ids, mask).logsumexp(-1).mean()
        loss.backward()
        return [router.weight.grad.clone() for router in layout.routers]

    plain = router_grads(None)
    for got, want in zip(router_grads(own), plain, strict=True):
        assert torch.equal(got, want)  # replaying its own choice changes nothing, gradients included
    for grad in router_grads((own + 1) % MOE_NUM_EXPERTS):
        assert grad.abs().amax() > 0 and torch.isfinite(grad).all()


def test_replay_rejects_bad_experts():
    model = tiny_moe("qwen3_moe")
    ids, mask = batch()
    good = torch.zeros(2, 8, 2, 2, dtype=torch.long)
    good[..., 1] = 3
    with pytest.raises(ValueError, match=r"\[B, S, L=2, k=2\]"):
        with replay(model, good[:, :, :1]):
            pass
    with pytest.raises(ValueError, match="distinct"):
        with replay(model, torch.zeros_like(good)):
            pass
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        with replay(model, good + 1):
            pass
    with pytest.raises(ValueError, match="integer"):
        with replay(model, good.float()):
            pass
    with replay(model, good), pytest.raises(RuntimeError, match="do not nest"):
        with replay(model, good):
            pass
    with torch.no_grad(), replay(model, good), pytest.raises(RuntimeError, match=r"\[2, 8\].*\[2, 5\]"):
        forward(model, ids[:, 3:], mask[:, 3:])


def test_routing_mismatch_by_hand():
    # B=1, S=3 tokens, L=2 layers, k=2; token 2 is masked out.
    a = torch.tensor([[[[0, 1], [2, 3]],    # token 0
                       [[0, 2], [1, 3]],    # token 1
                       [[0, 1], [0, 1]]]])  # token 2
    b = torch.tensor([[[[1, 0], [3, 2]],    # token 0: same sets in another order -> no difference
                       [[0, 3], [1, 3]],    # token 1: layer 0 differs ({0,2} vs {0,3}), layer 1 same
                       [[2, 3], [2, 3]]]])  # token 2: both differ, but masked
    mask = torch.tensor([[1, 1, 0]])
    got = routing_mismatch(a, b, mask)
    # counted pairs: 2 tokens x 2 layers = 4, of which 1 differs -> 1/4; tokens: 1 of 2 -> 1/2
    assert got["layer_mismatch_frac"].item() == 0.25
    assert got["token_mismatch_frac"].item() == 0.5
    # counting token 2 too: pairs 3 of 6 = 1/2; tokens 2 of 3
    got = routing_mismatch(a, b, torch.ones(1, 3))
    assert got["layer_mismatch_frac"].item() == 0.5
    assert abs(got["token_mismatch_frac"].item() - 2 / 3) < 1e-7
    nothing = routing_mismatch(a, b, torch.zeros(1, 3))
    assert nothing["layer_mismatch_frac"].item() == 0 and nothing["token_mismatch_frac"].item() == 0


def test_unknown_architecture_is_refused_by_name():
    dense = build_tiny_model("nano", tokenizer=TOKENIZER, arch="qwen2")
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM \(model_type='qwen2'\).*mixtral"):
        moe_layout(dense)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"), capture(dense):
        pass
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"), replay(dense, torch.zeros(1, 1, 2, 2, dtype=torch.long)):
        pass


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_load_balancing_loss(arch):
    model = tiny_moe(arch)
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
        plain = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    # about E * sum_e (1/E)(1/E) * k = k at init, where routing is near uniform
    assert abs(out.aux_loss.item() - MOE_TOP_K) < 0.5
    assert torch.allclose(out.loss, plain.loss + MOE_AUX_LOSS_COEF * out.aux_loss)
