import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradus.objectives import (
    dynamic_sampling_keep,
    kl_penalty,
    overlong_penalty,
    perplexity,
    sequence_log_ratio,
    value_loss,
)


def test_kl_hand_worked():
    # logp = log 0.5, ref = log 0.25: x = log(ref/pi) = log 0.5
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    x = math.log(0.5)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(-x)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * x * x)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - x - 1)  # e^x - x - 1


def test_kl_k3_gradient():
    # d k3 / d logp = 1 - pi_ref / pi = 1 - e^x; at x = log 0.5: 0.5
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    kl_penalty(logp, torch.tensor([[math.log(0.25)]], dtype=torch.float64), "k3").sum().backward()
    assert logp.grad.item() == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_k3_nonnegative_and_finite(a, b):
    k3 = kl_penalty(torch.tensor([[a]]), torch.tensor([[b]]), "k3")
    assert torch.isfinite(k3).all() and k3.item() >= 0
    assert kl_penalty(torch.tensor([[a]]), torch.tensor([[b]]), "k2").item() >= 0


def test_kl_is_zero_on_reference_and_errors():
    x = torch.randn(3, 4)
    for est in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(x, x.clone(), est) == 0)
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        kl_penalty(x, x, "k4")


def test_value_loss_hand_worked():
    # V = 1.5, V_old = 1.0, R = 2.0, clip 0.2: unclipped (1.5-2)^2 = 0.25; clipped V = 1.2 -> 0.64
    # max = 0.64, times 0.5 = 0.32 (the clipped term is larger: counted in value_clip_frac)
    # second token: V = 1.1 (inside the clip), R = 1.0 -> 0.5 * 0.01 = 0.005; token-mean = 0.1625
    values = torch.tensor([[1.5, 1.1]], requires_grad=True)
    loss, m = value_loss(values, torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.1625)
    assert m["value_clip_frac"] == 0.5
    loss.backward()
    # the clipped token has no gradient; the other: d/dV 0.5 (V - R)^2 / 2 tokens = (1.1 - 1) / 2
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.05]]))
    loss_unclipped, _ = value_loss(values, torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2),
                                   clip=None)
    assert loss_unclipped.item() == pytest.approx((0.125 + 0.005) / 2)


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0), (1000, -1.0)],
)
def test_overlong_penalty_cases(length, expected):
    # max_len 16, cache 4: free up to 12, then (12 - L) / 4, and -1 past 16
    assert overlong_penalty(torch.tensor([length]), max_len=16, cache_len=4).item() == pytest.approx(expected)


def test_overlong_penalty_dapo_defaults_and_errors():
    out = overlong_penalty(torch.tensor([16384, 18432, 20480, 20481]), max_len=20480, cache_len=4096)
    torch.testing.assert_close(out, torch.tensor([0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), max_len=4, cache_len=8)


def test_dynamic_sampling_keep():
    # groups of 3: (1,1,1) all right, (0,1,0) mixed, (0,0,0) all wrong, (0.5,0.5,0.2) mixed non-binary
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 0.2])
    assert dynamic_sampling_keep(rewards, 3).tolist() == [False, True, False, True]
    assert dynamic_sampling_keep(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]


def test_sequence_ratio_is_perplexity_ratio(batch):
    logp, old, _, mask = batch
    s = torch.exp(sequence_log_ratio(logp, old, mask))
    ratio = perplexity(old, mask) / perplexity(logp, mask)
    torch.testing.assert_close(s, ratio, rtol=1e-12, atol=0)
    # hand: tokens log-probs (log 0.5, log 0.25): PPL = exp(-(log 0.5 + log 0.25) / 2) = sqrt(8)
    assert perplexity(torch.log(torch.tensor([[0.5, 0.25]])), torch.ones(1, 2)).item() == pytest.approx(8 ** 0.5)
    # empty rows: log s = 0, PPL = 1
    assert s[3].item() == 1.0 and perplexity(logp, mask)[3].item() == 1.0


def test_gspo_positive_advantage_lowers_perplexity(batch):
    """A gradient step on GSPO's loss with A > 0 lowers the new policy's perplexity on that sequence."""
    from gradus.objectives import policy_loss

    logp, _, _, mask = batch
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, logp.clone(), torch.ones(5, dtype=torch.float64), mask, algo="gspo")
    (g,) = torch.autograd.grad(loss, x)
    after = perplexity(logp - 0.1 * g, mask)
    counted = mask.sum(-1) > 0
    assert torch.all(after[counted] < perplexity(logp, mask)[counted])
