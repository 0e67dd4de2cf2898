"""Every preset on numbers worked out by hand in the comments."""

import math

import pytest
import torch

from gradus.objectives import policy_loss


def _lp(ratios):
    """logp with old_logp = 0 so that r = exp(logp) equals the given ratios."""
    logp = torch.log(torch.tensor(ratios, dtype=torch.float64))
    return logp, torch.zeros_like(logp)


def test_ppo_clip_and_metrics():
    # token 1: r = 1.5, A = +1: max(-1.5, -1.2) = -1.2   (clipped high)
    # token 2: r = 0.5, A = -1: max(0.5, 0.8) = 0.8      (clipped low)
    # token-mean: (-1.2 + 0.8) / 2 = -0.2
    logp, old = _lp([[1.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 2), algo="ppo")
    assert loss.item() == pytest.approx(-0.2)
    assert m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0.5
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["ratio_mean"] == pytest.approx(1.0)
    # approx_kl: mean of (r - 1) - log r = ((0.5 - log 1.5) + (-0.5 - log 0.5)) / 2
    assert m["approx_kl"] == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)


def test_ppo_dual_clip():
    # r = 4, A = -1: max(4, 1.2) = 4; the dual clip bounds it at c * |A| = 3
    logp, old = _lp([[4.0]])
    adv = torch.tensor([[-1.0]], dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 1), algo="ppo", dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert m["dual_clip_frac"] == 1.0
    loss_plain, _ = policy_loss(logp, old, adv, torch.ones(1, 1), algo="ppo")
    assert loss_plain.item() == pytest.approx(4.0)


# Two sequences, advantage +1 each: seq 0 has ratios (1, 1.5), seq 1 has ratio (0.5) and a pad.
RATIOS = [[1.0, 1.5], [0.5, 1.0]]
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, 1.0], dtype=torch.float64)


def test_grpo_seq_mean_token_mean():
    # seq 0: tokens -1 and max(-1.5, -1.2) = -1.2 -> mean -1.1
    # seq 1: max(-0.5, -0.8) = -0.5 (A > 0 is not clipped below) -> -0.5
    # mean over sequences: (-1.1 - 0.5) / 2 = -0.8
    loss, _ = policy_loss(*_lp(RATIOS), ADV, MASK, algo="grpo")
    assert loss.item() == pytest.approx(-0.8)


def test_dapo_token_mean_clip_higher():
    # eps_high = 0.28: r = 1.5 is clipped to 1.28. Tokens: -1, -1.28, -0.5 -> sum -2.78 over 3 tokens
    loss, m = policy_loss(*_lp(RATIOS), ADV, MASK, algo="dapo")
    assert loss.item() == pytest.approx(-2.78 / 3)
    assert m["clip_frac_high"] == pytest.approx(1 / 3)


def test_dr_grpo_constant_norm():
    # token sums: seq 0: -1 - 1.2 = -2.2; seq 1: -0.5. Divided by the norm 4, mean over sequences:
    # (-0.55 - 0.125) / 2 = -0.3375
    loss, _ = policy_loss(*_lp(RATIOS), ADV, MASK, algo="dr_grpo", agg_norm=4.0)
    assert loss.item() == pytest.approx(-0.3375)


def test_gspo_sequence_ratio_clip():
    # log r = (0.2, 0.4) -> log s = 0.3, s = e^0.3 = 1.34986. eps_high = 4e-4.
    # A = +1: max(-1.34986, -1.0004) = -1.0004 (sequence clipped high)
    # A = -1: max(1.34986, 1.0004) = 1.34986 (not clipped: a sequence made *more* likely with A < 0)
    logp = torch.tensor([[0.2, 0.4], [0.2, 0.4]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones(2, 2), algo="gspo")
    assert loss.item() == pytest.approx((-1.0004 + math.exp(0.3)) / 2)
    assert m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0.0
    assert m["ratio_mean"] == pytest.approx(math.exp(0.3))


def test_sapo_gate_values():
    # r = 1: f(1) = sigmoid(0) * 4 / tau = 2 / tau.
    # A = +1 (tau_pos = 1): loss -2.  A = -1 (tau_neg = 1.05): loss +2/1.05.  mean: (-2 + 1.904762) / 2
    logp = torch.zeros(2, 1, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, logp.clone(), adv, torch.ones(2, 1), algo="sapo")
    assert loss.item() == pytest.approx((-2.0 + 2.0 / 1.05) / 2)
    assert m["gate_weight_mean"] == pytest.approx(1.0)
    # off policy: r = e^1, A = +1: f = sigmoid(e - 1) * 4, gate weight 4 s (1 - s)
    logp = torch.ones(1, 1, dtype=torch.float64)
    loss, m = policy_loss(logp, torch.zeros_like(logp), torch.ones(1, dtype=torch.float64), torch.ones(1, 1),
                          algo="sapo")
    s = 1 / (1 + math.exp(-(math.e - 1)))
    assert loss.item() == pytest.approx(-4 * s)
    assert m["gate_weight_mean"] == pytest.approx(4 * s * (1 - s))


def test_cispo_weight_and_value():
    # token: logp = log 6 - 2 (r = 6 with old = log 6 - 2 - log 6 ...): build directly
    # old_logp = -2 - log 6, logp = -2 -> r = 6, capped at 5; A = +1: loss = -5 * 1 * (-2) = 10
    logp = torch.tensor([[-2.0]], dtype=torch.float64)
    old = logp - math.log(6.0)
    loss, m = policy_loss(logp, old, torch.ones(1, dtype=torch.float64), torch.ones(1, 1), algo="cispo")
    assert loss.item() == pytest.approx(10.0)
    assert m["clip_frac_high"] == 1.0
    # no lower bound: r = 0.01 keeps weight 0.01: loss = -0.01 * 1 * (-2) = 0.02
    loss, m = policy_loss(logp, logp - math.log(0.01), torch.ones(1, dtype=torch.float64), torch.ones(1, 1),
                          algo="cispo")
    assert loss.item() == pytest.approx(0.02)
    assert m["clip_frac_low"] == 0.0
