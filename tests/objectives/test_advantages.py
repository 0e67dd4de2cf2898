import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradus.objectives import ADV_SCALES, gae, group_advantages, masked_whiten, outcome_token_rewards

from .oracle import gae_loop, group_adv_loop


def test_group_hand_worked():
    # group (1, 0, 0, 1): mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    # group (1, 1, 1, 1): all equal -> exactly 0
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 4, eps=0.0)
    expected = 0.5 / (1 / 3) ** 0.5
    torch.testing.assert_close(adv, torch.tensor([expected, -expected, -expected, expected, 0, 0, 0, 0]))


@pytest.mark.parametrize("scale", ADV_SCALES)
@pytest.mark.parametrize("g", [1, 2, 3, 8])
def test_group_matches_loop(scale, g):
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(g), dtype=torch.float64).round(decimals=1)
    rewards[:g] = 0.3  # one all-equal group
    fast = group_advantages(rewards, g, scale=scale, eps=1e-6)
    slow = group_adv_loop(rewards.tolist(), g, scale, 1e-6)
    torch.testing.assert_close(fast, torch.tensor(slow, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.all(fast[:g] == 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=6), st.integers(1, 5))
def test_all_equal_groups_are_exactly_zero(values, repeats):
    for value in values:
        rewards = torch.full((repeats * 3,), value)
        for scale in ADV_SCALES:
            assert torch.all(group_advantages(rewards, repeats, scale=scale) == 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=8, max_size=8))
def test_group_advantages_are_centred(bits):
    adv = group_advantages(torch.tensor(bits, dtype=torch.float64), 4)
    assert abs(adv[:4].sum().item()) < 1e-9 and abs(adv[4:].sum().item()) < 1e-9


def test_group_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="valid: group, batch, none"):
        group_advantages(torch.zeros(8), 4, scale="std")


def _gae_inputs(B, T, seed, holes=False):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    if holes:  # e.g. masked tool output in the middle of a completion
        mask = mask * (torch.rand(B, T, generator=g) > 0.3).double()
    return rewards, values, mask


@pytest.mark.parametrize("T", [1, 9, 128, 300])  # 300 spans three blocks of 128
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.0), (0.99, 1.0)])
def test_gae_matches_textbook_recursion(T, holes, gamma, lam):
    rewards, values, mask = _gae_inputs(4, T, seed=T, holes=holes)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=False)
    adv_ref, ret_ref = gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-10, atol=1e-10)


def test_gae_hand_worked():
    # gamma = 1, lam = 0.5, rewards (0, 0, 1), values (0.5, 0.5, 0.5), V after the end = 0:
    # delta = (0 + 0.5 - 0.5, 0 + 0.5 - 0.5, 1 + 0 - 0.5) = (0, 0, 0.5)
    # A_2 = 0.5; A_1 = 0 + 0.5 * 0.5 = 0.25; A_0 = 0 + 0.5 * 0.25 = 0.125; returns = A + V
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0, 9.0]]), torch.full((1, 4), 0.5),
                   torch.tensor([[1.0, 1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.25, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 0.75, 1.0, 0.0]]))


def test_gae_whiten():
    rewards, values, mask = _gae_inputs(6, 20, seed=1)
    adv, _ = gae(rewards, values, mask, whiten=True)
    counted = adv[mask > 0]
    assert abs(counted.mean().item()) < 1e-9
    assert counted.std().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(adv[mask == 0] == 0)
    raw, _ = gae(rewards, values, mask, whiten=False)
    torch.testing.assert_close(masked_whiten(raw, mask), adv)


def test_batch_statistics_over_shards():
    # `total` sums over the shards of a batch; two identical shards are one batch of both: doubling
    # every local sum must give exactly the doubled batch's mean and (unbiased, n - 1) variance
    rewards, values, mask = _gae_inputs(6, 20, seed=2)
    raw, _ = gae(rewards, values, mask, whiten=False)
    both, both_mask = torch.cat([raw, raw]), torch.cat([mask, mask])
    torch.testing.assert_close(masked_whiten(raw, mask, total=lambda t: 2 * t), masked_whiten(both, both_mask)[:6])
    adv, _ = gae(rewards, values, mask, total=lambda t: 2 * t)
    torch.testing.assert_close(adv, masked_whiten(both, both_mask)[:6])
    assert not torch.allclose(adv, masked_whiten(raw, mask))  # n - 1 differs, so the scale does
    r = torch.tensor([0.0, 1.0, 1.0, 1.0])
    doubled = group_advantages(torch.cat([r, r]), 2, scale="batch")
    torch.testing.assert_close(group_advantages(r, 2, scale="batch", total=lambda t: 2 * t), doubled[:4])
    # by hand: batch of 8 rewards, mean 0.75, unbiased var (2 * 0.5625 + 6 * 0.0625) / 7 = 1.5 / 7
    std = (1.5 / 7) ** 0.5
    torch.testing.assert_close(doubled[:4], torch.tensor([-0.5, 0.5, 0.0, 0.0]) / (std + 1e-6))


def test_outcome_token_rewards():
    # score on the last counted token; -kl_coef * kl on every counted token
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.full((3, 3), 0.5)
    out = outcome_token_rewards(torch.tensor([2.0, 5.0, -1.0]), mask, kl, kl_coef=0.1)
    torch.testing.assert_close(out, torch.tensor([[-0.05, 1.95, 0.0], [0.0, 0.0, 0.0], [-0.05, -0.05, -1.05]]))


def test_turn_rewards_stay_on_their_turns_and_gae_discounts_each_from_its_own():
    # Two turns: counted tokens at columns 0, 1 (turn 1, paid 0.5 at column 1) and 4, 5 (turn 2, paid 1.0 at
    # column 5); columns 2, 3 are the environment's answer. The score 1.3 is the turns' 1.5 plus an overlong
    # penalty of -0.2, which no turn placed: it goes to the last counted token, so the row still sums to 1.3.
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    turns = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 1.0]])
    out = outcome_token_rewards(torch.tensor([1.3]), mask, turn_rewards=turns)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 0.8]]))
    # a turn reward on a token the loss left out (column 2) moves to the last counted token
    moved = outcome_token_rewards(torch.tensor([1.0]), mask, turn_rewards=torch.tensor([[0.0, 0, 0.4, 0, 0, 0.6]]))
    torch.testing.assert_close(moved, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]))
    # GAE with V = 0, lam = 1, gamma = 0.5 over the counted tokens only, by hand from the end:
    # A_5 = 0.8; A_4 = 0 + 0.5 * 0.8 = 0.4; A_1 = 0.5 + 0.5 * 0.4 = 0.7; A_0 = 0.5 * 0.7 = 0.35
    adv, _ = gae(out, torch.zeros_like(out), mask, gamma=0.5, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.35, 0.7, 0.0, 0.0, 0.4, 0.8]]))
    # the outcome at the end instead (no turn rewards): A_1 = 0.5^2 * 1.3, the first turn's reward discounted
    late, _ = gae(outcome_token_rewards(torch.tensor([1.3]), mask), torch.zeros_like(out), mask, gamma=0.5, lam=1.0,
                  whiten=False)
    torch.testing.assert_close(late[0, 1], torch.tensor(0.25 * 1.3))
