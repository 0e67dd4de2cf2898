"""The advantage estimators adopted after GRPO (RLOO, REINFORCE++ and its baseline form, pass@k, GDPO):
hand-worked numbers, loop oracles, the registry's entries and their errors, batch statistics over shards."""

import math

import pytest
import torch

from gradus.objectives import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageSettings,
    estimate,
    gdpo_advantages,
    group_advantages,
    passk_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_rewards,
)

from .oracle import gae_loop

F64 = torch.float64


# --- hand-worked -------------------------------------------------------------------------------------------


def test_rloo_by_hand():
    # group (1, 0, 0, 1): for a 1 the others' mean is (0 + 0 + 1) / 3 = 1/3 -> 2/3; for a 0 it is 2/3 -> -2/3
    # group (0.5, 0.5, 0.5, 0.5): exactly 0
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=F64), 4)
    torch.testing.assert_close(adv, torch.tensor([2, -2, -2, 2, 0, 0, 0, 0], dtype=F64) / 3, rtol=1e-15, atol=0)
    assert torch.all(adv[4:] == 0)
    # = G / (G - 1) times GRPO's centred advantage
    r = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(rloo_advantages(r, 3), 1.5 * group_advantages(r, 3, scale="none"))


def test_passk_by_hand():
    # group (0.2, 0.9, 0.5, 0.1): the best (0.9) gets its margin over 0.5, 0.4, over the group's sample std:
    # mean 0.425, squared deviations 0.050625 + 0.225625 + 0.005625 + 0.105625 = 0.3875, std sqrt(0.3875 / 3)
    # group (0.2, 0.9, 0.5, 0.9): a tie at the top, margin 0: all 0
    r = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.2, 0.9, 0.5, 0.9], dtype=F64)
    std = math.sqrt(0.3875 / 3)
    expected = torch.tensor([0, 0.4 / (std + 1e-6), 0, 0, 0, 0, 0, 0], dtype=F64)
    torch.testing.assert_close(passk_advantages(r, 4), expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(passk_advantages(r, 4, scale="none"), torch.tensor([0, 0.4, 0, 0, 0, 0, 0, 0],
                                                                                   dtype=F64), rtol=1e-12, atol=1e-15)
    # binary rewards: a group with one success gives it 1 (unscaled); two successes give nothing
    binary = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=F64)
    assert passk_advantages(binary, 4, scale="none").tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def test_gdpo_by_hand():
    # G = 2, two rewards with weights (1, 0.5):
    #   r1 = (1, 0 | 1, 1): groups -> (+-0.5 / 0.70711) = (0.70711, -0.70711 | 0, 0)
    #   r2 = (0, 1 | 0.5, 0.2): -> (-0.70711, 0.70711 | 0.70711, -0.70711)  (0.15 / 0.21213 = 0.70711)
    #   sum = (0.35355, -0.35355 | 0.35355, -0.35355): mean 0, unbiased var 4 * 0.125 / 3 -> each +-0.86603
    parts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5], [1.0, 0.2]], dtype=F64)
    adv = gdpo_advantages(parts, (1.0, 0.5), 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1, -1, 1, -1], dtype=F64) * math.sqrt(0.75), rtol=1e-6, atol=0)


def test_gdpo_keeps_what_grpo_on_the_sum_collapses():
    # Four completions of one prompt scored by two binary rewards: (1,1), (1,0), (0,1), (0,0). GRPO on the sum
    # (2, 1, 1, 0) gives the two one-reward completions the same advantage as ... each other, as GDPO does, but with
    # a second group whose sums tie differently the scales differ. The paper's point, in the smallest case: (1,0)
    # and (0,1) against (0,0) and (1,1) in a group of 2 each: sums (1, 1) -> GRPO 0, 0; GDPO separates them.
    parts = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    assert torch.all(group_advantages(parts.sum(-1), 2) == 0)
    adv = gdpo_advantages(torch.cat([parts, torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64)]), (1.0, 2.0), 2)
    assert adv[0] != adv[1]  # a weight of 2 on the second reward: (0, 1) beats (1, 0)
    assert adv[1] > adv[0]


def test_reinforce_pp_by_hand():
    # row 0: two counted tokens, KL (0.1, 0.2), outcome 1, kl_coef 0.5: token rewards (-0.05, -0.1 + 1);
    #        returns (gamma = 1): (0.85, 0.9); row 1: three tokens, outcome 0, KL 0: returns 0.
    # whitened over the 5 counted tokens: mean 0.35, unbiased var (0.25 + 0.3025 + 3 * 0.1225) / 4 = 0.23
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.0, 0.0, 0.0]], dtype=F64)
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0], dtype=F64), mask, group_size=1, kl=kl)
    out = estimate("reinforce_pp", inputs, AdvantageSettings(kl_coef=0.5))
    expected = (torch.tensor([[0.85, 0.9, 0.35], [0, 0, 0]], dtype=F64) - 0.35) / math.sqrt(0.23 + 1e-8) * mask
    torch.testing.assert_close(out.advantages, expected, rtol=1e-12, atol=1e-12)
    # gamma = 0.5: returns (-0.05 + 0.5 * 0.9, 0.9) = (0.4, 0.9)
    g = estimate("reinforce_pp", inputs, AdvantageSettings(kl_coef=0.5, gamma=0.5)).advantages
    raw = torch.tensor([0.4, 0.9, 0.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(g[mask > 0], (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8), rtol=1e-12, atol=0)


def test_reinforce_pp_baseline_by_hand():
    # G = 2: rewards (1, 0 | 0.5, 0.5), KL 0.1 on every counted token, kl_coef 1: R = r - sum_t KL
    # lengths (2, 1 | 1, 3): R = (0.8, -0.1 | 0.4, 0.2); minus group means (0.35 | 0.3): (0.45, -0.45 | 0.1, -0.1)
    # on every token: (0.45, 0.45 | -0.45 | 0.1 | -0.1, -0.1, -0.1), whitened over these 7
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=F64)
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=F64), mask, group_size=2,
                             kl=torch.full((4, 3), 0.1, dtype=F64))
    adv = estimate("reinforce_pp_baseline", inputs, AdvantageSettings(kl_coef=1.0)).advantages
    raw = torch.tensor([0.45, 0.45, -0.45, 0.1, -0.1, -0.1, -0.1], dtype=F64)
    torch.testing.assert_close(adv[mask > 0], (raw - raw.mean()) / torch.sqrt(raw.var() + 1e-8), rtol=1e-12, atol=0)
    assert torch.all(adv[mask == 0] == 0)


def test_rloo_puts_the_kl_in_the_reward():
    # R = r - beta sum_t KL over counted tokens: (1 - 0.5 * 0.3, 0 - 0.5 * 0.1) = (0.85, -0.05); G = 2: +-0.9
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    kl = torch.tensor([[0.1, 0.2], [0.1, 5.0]], dtype=F64)
    torch.testing.assert_close(sequence_rewards(torch.tensor([1.0, 0.0], dtype=F64), mask, kl, 0.5),
                               torch.tensor([0.85, -0.05], dtype=F64))
    out = estimate("rloo", AdvantageInputs(torch.tensor([1.0, 0.0], dtype=F64), mask, 2, kl=kl),
                   AdvantageSettings(kl_coef=0.5))
    torch.testing.assert_close(out.advantages, torch.tensor([0.9, -0.9], dtype=F64))


# --- loop oracles --------------------------------------------------------------------------------------------


def _rewards(seed, n=24, decimals=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64).round(decimals=decimals)


@pytest.mark.parametrize("g", [2, 3, 8])
def test_rloo_and_passk_match_loops(g):
    r = _rewards(g)
    r[:g] = 0.3  # an all-equal group
    values = r.tolist()
    rloo, passk = [], []
    for k in range(0, len(values), g):
        grp = values[k:k + g]
        rloo += [0.0 if max(grp) == min(grp) else x - (sum(grp) - x) / (g - 1) for x in grp]
        best = max(range(g), key=lambda j: (grp[j], -j))  # the first maximum
        ranked = sorted(grp, reverse=True)
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
        passk += [(ranked[0] - ranked[1]) / (std + 1e-6) if j == best else 0.0 for j in range(g)]
    torch.testing.assert_close(rloo_advantages(r, g), torch.tensor(rloo, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(passk_advantages(r, g), torch.tensor(passk, dtype=F64), rtol=1e-12, atol=1e-12)
    assert torch.all(rloo_advantages(r, g)[:g] == 0) and torch.all(passk_advantages(r, g)[:g] == 0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_gdpo_matches_loop(scale):
    from .oracle import group_adv_loop

    parts = torch.stack([_rewards(1), _rewards(2), _rewards(3)], dim=1)  # [24, 3]
    parts[:4, 1] = 0.5  # a group flat in one reward only
    weights = (1.0, 0.5, 2.0)
    per_reward = [group_adv_loop(parts[:, k].tolist(), 4, scale, 1e-6) for k in range(3)]
    summed = [sum(w * adv[i] for w, adv in zip(weights, per_reward, strict=True)) for i in range(24)]
    mean = sum(summed) / 24
    var = sum((x - mean) ** 2 for x in summed) / 23
    expected = torch.tensor([(x - mean) / math.sqrt(var + 1e-8) for x in summed], dtype=F64)
    torch.testing.assert_close(gdpo_advantages(parts, weights, 4, scale=scale), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_the_textbook_return(gamma):
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(5, 11, generator=g, dtype=F64)
    mask = (torch.rand(5, 11, generator=g) < 0.8).to(F64)  # holes: masked positions are skipped, not ends
    returns, _ = gae_loop(rewards, torch.zeros(5, 11, dtype=F64), mask, gamma, 1.0)  # V = 0, lam = 1: G_t
    x = returns[mask > 0]
    expected = (returns - x.mean()) / torch.sqrt(x.var() + 1e-8) * mask
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma=gamma), expected, rtol=1e-10, atol=1e-12)


# --- the registry -------------------------------------------------------------------------------------------


def test_registry_entries_declare_what_they_need():
    assert {"rloo", "reinforce_pp", "reinforce_pp_baseline", "grpo_passk", "gdpo"} <= set(ESTIMATORS)
    assert all(ESTIMATORS[n].kl_in_reward for n in ("rloo", "reinforce_pp", "reinforce_pp_baseline"))
    assert not any(ESTIMATORS[n].uses_critic for n in ("rloo", "reinforce_pp", "grpo_passk", "gdpo"))
    assert ESTIMATORS["gdpo"].needs_reward_parts and not ESTIMATORS["rloo"].needs_reward_parts
    assert ESTIMATORS["reinforce_pp"].min_group_size == 1 and ESTIMATORS["rloo"].min_group_size == 2
    assert ESTIMATORS["reinforce_pp"].knobs == ("gamma",)


def test_estimators_refuse_missing_inputs():
    mask = torch.ones(4, 2)
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0, 1.0, 1.0]), mask, group_size=2)
    with pytest.raises(ValueError, match=r"gdpo estimator normalises each reward on its own: it needs "
                                         r"AdvantageInputs.reward_parts"):
        estimate("gdpo", inputs, AdvantageSettings())
    for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline"):
        with pytest.raises(ValueError, match=rf"the {name} estimator puts the KL in the reward \(kl_coef=0.1\)"):
            estimate(name, inputs, AdvantageSettings(kl_coef=0.1))
        estimate(name, inputs, AdvantageSettings(kl_coef=0.0))  # no KL, no reference needed
    with pytest.raises(ValueError, match="groups of at least 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of at least 2"):
        passk_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="2 reward weights for 3 rewards"):
        gdpo_advantages(torch.zeros(4, 3), (1.0, 1.0), 2)


def test_gdpo_through_the_registry_reads_the_parts():
    parts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5], [1.0, 0.2]], dtype=F64)
    inputs = AdvantageInputs(parts @ torch.tensor([1.0, 0.5], dtype=F64), torch.ones(4, 2), 2, reward_parts=parts,
                             reward_weights=(1.0, 0.5))
    out = estimate("gdpo", inputs, AdvantageSettings(adv_scale="none"))
    torch.testing.assert_close(out.advantages, gdpo_advantages(parts, (1.0, 0.5), 2, scale="none"))
    assert out.metrics["adv/abs_mean"] > 0


def test_batch_statistics_over_shards():
    # `total` sums over the shards; two identical shards are one batch of both (as in test_advantages)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(6, 5, generator=g) < 0.8).to(F64)
    rewards, parts = torch.rand(6, generator=g, dtype=F64), torch.rand(6, 2, generator=g, dtype=F64)
    double = lambda t: 2 * t  # noqa: E731
    both = torch.cat([mask, mask])
    torch.testing.assert_close(reinforce_pp_baseline_advantages(rewards, mask, 2, total=double),
                               reinforce_pp_baseline_advantages(torch.cat([rewards, rewards]), both, 2)[:6])
    torch.testing.assert_close(gdpo_advantages(parts, (1.0, 0.5), 3, total=double),
                               gdpo_advantages(torch.cat([parts, parts]), (1.0, 0.5), 3)[:6])
    token_rewards = torch.randn(6, 5, generator=g, dtype=F64)
    torch.testing.assert_close(reinforce_pp_advantages(token_rewards, mask, total=double),
                               reinforce_pp_advantages(torch.cat([token_rewards, token_rewards]), both)[:6])
    assert not torch.allclose(gdpo_advantages(parts, (1.0, 0.5), 3, total=double),
                              gdpo_advantages(parts, (1.0, 0.5), 3))  # n - 1 differs, so the scale does
