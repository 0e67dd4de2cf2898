"""Identities the objectives must satisfy, and edge cases."""

import math

import pytest
import torch

from gradus.objectives import PRESETS, agg_loss, group_advantages, policy_loss, resolve_objective, valid_knobs

ON_POLICY_ALGOS = ["ppo", "grpo", "dapo", "gspo", "gspo_token", "sapo", "dr_grpo", "cispo"]


@pytest.mark.parametrize("algo", ON_POLICY_ALGOS)
def test_on_policy_gradient_is_plain_policy_gradient(algo, batch):
    """At logp == old_logp every objective's gradient is that of -A * logp under its aggregation."""
    logp, _, adv, mask = batch
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, logp.clone(), adv, mask, algo=algo)
    (g,) = torch.autograd.grad(loss, x)
    y = logp.clone().requires_grad_(True)
    obj = resolve_objective(algo)
    plain = agg_loss(-adv[:, None] * y, mask, obj.agg, norm=obj.agg_norm)
    (g_plain,) = torch.autograd.grad(plain, y)
    torch.testing.assert_close(g, g_plain, rtol=1e-12, atol=1e-14)
    assert g.abs().sum() > 0


def test_sapo_gate_slope_one_and_value_two_over_tau():
    for tau_name, sign in (("tau_pos", 1.0), ("tau_neg", -1.0)):
        tau = resolve_objective("sapo").knobs()[tau_name]
        # loss = -A f(r): with A = sign, d loss / d r = -A f'(r); read f'(1) off the gradient wrt logp
        # at r = 1 (d r / d logp = r = 1).
        logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
        loss, _ = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([sign]),
                              torch.ones(1, 1), algo="sapo")
        (g,) = torch.autograd.grad(loss, logp)
        assert -g.item() / sign == pytest.approx(1.0, abs=1e-12)  # f'(1) = 1
        assert -loss.item() / sign == pytest.approx(2.0 / tau, abs=1e-12)  # f(1) = 2 / tau


def test_sapo_gate_is_below_one_off_policy(batch):
    logp, old, adv, mask = batch
    _, m = policy_loss(logp, old, adv, mask, algo="sapo")
    assert 0 < m["gate_weight_mean"] < 1


@pytest.mark.parametrize("clips", [{}, {"clip_low": 0.05, "clip_high": 0.1}])
def test_gspo_token_equals_gspo_for_sequence_advantages(clips, batch):
    logp, old, adv, mask = batch
    results = []
    for algo in ("gspo", "gspo_token"):
        x = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(x, old, adv, mask, algo=algo, **clips)
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "dapo", "dr_grpo", "gspo_token"])
def test_zero_gradient_in_clipped_region_token(algo):
    obj = resolve_objective(algo)
    # r above 1 + eps_high with A > 0, and r below 1 - eps_low with A < 0, every token
    for ratio, a in ((1 + obj.clip_high + 0.05, 1.0), (1 - obj.clip_low - 0.05, -1.0)):
        logp = torch.full((2, 3), math.log(ratio), dtype=torch.float64, requires_grad=True)
        loss, m = policy_loss(logp, torch.zeros(2, 3, dtype=torch.float64), torch.tensor([a, a]),
                              torch.ones(2, 3), algo=algo)
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.all(g == 0)
        assert m["clip_frac_high" if a > 0 else "clip_frac_low"] == 1.0
        # just inside the clip range the gradient is not zero
        logp2 = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
        loss2, _ = policy_loss(logp2, torch.zeros(2, 3, dtype=torch.float64), torch.tensor([a, a]),
                               torch.ones(2, 3), algo=algo)
        assert torch.autograd.grad(loss2, logp2)[0].abs().sum() > 0


def test_zero_gradient_in_clipped_region_gspo():
    # log s = mean of (0.01, 0.03) = 0.02 -> s = 1.0202 > 1 + 4e-4 with A > 0: clipped, no gradient
    logp = torch.tensor([[0.01, 0.03]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1.0]),
                          torch.ones(1, 2), algo="gspo")
    assert torch.all(torch.autograd.grad(loss, logp)[0] == 0)


def test_token_mean_vs_seq_mean_presets(batch):
    """dapo (token-mean) and grpo-with-clip-higher (seq-mean-token-mean) agree only for equal lengths."""
    logp, old, adv, _ = batch
    equal = torch.ones_like(logp)
    a, _ = policy_loss(logp, old, adv, equal, algo="dapo")
    b, _ = policy_loss(logp, old, adv, equal, algo="grpo", clip_high=0.28)
    torch.testing.assert_close(a, b)
    ragged = equal.clone()
    ragged[0, 2:] = 0
    a, _ = policy_loss(logp, old, adv, ragged, algo="dapo")
    b, _ = policy_loss(logp, old, adv, ragged, algo="grpo", clip_high=0.28)
    assert not torch.allclose(a, b)


# ---- edge cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("algo", list(PRESETS))
def test_all_equal_rewards_give_zero_loss_and_gradient(algo, batch):
    logp, old, _, mask = batch
    adv = group_advantages(torch.full((5,), 0.7, dtype=torch.float64), group_size=5)
    assert torch.equal(adv, torch.zeros(5, dtype=torch.float64))
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, algo=algo)
    assert loss.item() == 0.0
    assert torch.all(torch.autograd.grad(loss, x)[0] == 0)


@pytest.mark.parametrize("algo", list(PRESETS))
def test_empty_rows_and_all_empty(algo):
    logp = torch.randn(2, 4, requires_grad=True)
    mask = torch.zeros(2, 4)
    loss, m = policy_loss(logp, logp.detach(), torch.ones(2), mask, algo=algo)
    assert loss.item() == 0.0 and all(math.isfinite(v) for v in m.values())
    mask[0, :2] = 1
    loss, m = policy_loss(logp, logp.detach() - 0.1, torch.ones(2), mask, algo=algo)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.all(g[1] == 0) and all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("algo", list(PRESETS))
def test_group_of_one(algo):
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))
    logp = torch.randn(3, 2, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(3, 2), algo=algo)
    assert loss.item() == 0.0


@pytest.mark.parametrize("algo", list(PRESETS))
def test_bf16_inputs(algo, batch):
    logp, old, adv, mask = batch
    x = logp.to(torch.bfloat16).requires_grad_(True)
    loss, m = policy_loss(x, old.to(torch.bfloat16), adv.to(torch.bfloat16), mask, algo=algo)
    assert loss.dtype == torch.float32  # computed in fp32
    (g,) = torch.autograd.grad(loss, x)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    ref, _ = policy_loss(x.detach().double(), old.to(torch.bfloat16).double(), adv.to(torch.bfloat16).double(),
                         mask, algo=algo)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("algo", list(PRESETS))
@pytest.mark.parametrize("shift", [50.0, -50.0, 1e4, -1e4])
def test_extreme_log_ratios_stay_finite(algo, shift):
    logp = torch.zeros(3, 4, requires_grad=True)
    old = torch.full((3, 4), -shift)
    old[1] = 0.0
    loss, m = policy_loss(logp, old, torch.tensor([1.0, -1.0, -2.0]), torch.ones(3, 4), algo=algo, **(
        {"dual_clip": 3.0} if "dual_clip" in valid_knobs(algo) else {}))
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert all(math.isfinite(v) for v in m.values())


# ---- registry ---------------------------------------------------------------------------------

def test_unknown_algo_and_knob_errors():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="valid algos: ppo, grpo, dapo, gspo, gspo_token, sapo, dr_grpo, cispo"):
        policy_loss(x, x, torch.zeros(1), x, algo="trpo")
    with pytest.raises(ValueError, match="not used by algo 'sapo'.*valid knobs: tau_pos, tau_neg"):
        policy_loss(x, x, torch.zeros(1), x, algo="sapo", clip_high=0.3)
    with pytest.raises(ValueError, match="dual_clip"):
        resolve_objective("gspo", dual_clip=3.0)
    with pytest.raises(ValueError, match="agg_norm is only used"):
        resolve_objective("grpo", agg_norm=10.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        resolve_objective("ppo", dual_clip=0.5)
    with pytest.raises(ValueError, match="valid modes"):
        resolve_objective("dapo", agg="sum")


def test_preset_defaults_match_the_papers():
    assert resolve_objective("dapo").knobs() == {
        "clip_low": 0.2, "clip_high": 0.28, "dual_clip": None, "agg": "token-mean", "agg_norm": None}
    assert (PRESETS["gspo"].clip_low, PRESETS["gspo"].clip_high) == (3e-4, 4e-4)
    assert (PRESETS["sapo"].tau_pos, PRESETS["sapo"].tau_neg) == (1.0, 1.05)
    assert 1 + PRESETS["cispo"].clip_high == 5.0 and PRESETS["cispo"].clip_low is None
    assert PRESETS["grpo"].agg == "seq-mean-token-mean" and PRESETS["ppo"].agg == "token-mean"
