"""The members adopted after SAPO (GMPO, DPPO, Clip-Cov, KL-Cov) and the entropy diagnostics on numbers
worked out by hand in the comments, values and gradients, and the identities they must satisfy."""

import math

import pytest
import torch

from gradus.objectives import covariance_metrics, policy_loss, resolve_objective, token_covariance
from gradus.objectives.policy import binary_kl

F64 = torch.float64


def _grad(algo, logp, old, adv, mask, **kw):
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, algo=algo, **kw)
    return loss.item(), torch.autograd.grad(loss, x)[0], m


# --- GMPO -----------------------------------------------------------------------------------------------


def test_gmpo_clips_each_token_in_log_space_on_its_advantages_side():
    old = torch.zeros(1, 2, dtype=F64)
    # A = +1, log r = (0.2, 0.6), eps 0.4: c = (0.2, 0.4) -> s = e^0.3, loss -e^0.3. The clipped token has no
    # gradient; the other gets -A s / |o| = -e^0.3 / 2.
    loss, g, m = _grad("gmpo", torch.tensor([[0.2, 0.6]], dtype=F64), old, torch.ones(1, dtype=F64), torch.ones(1, 2))
    assert loss == pytest.approx(-math.exp(0.3))
    torch.testing.assert_close(g, torch.tensor([[-math.exp(0.3) / 2, 0.0]], dtype=F64))
    assert m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0.0
    assert m["ratio_mean"] == pytest.approx(math.exp(0.3))
    # A = -1, log r = (-0.6, 0.2): c = (-0.4, 0.2) -> s = e^-0.1, loss +e^-0.1; the first token is held
    loss, g, m = _grad("gmpo", torch.tensor([[-0.6, 0.2]], dtype=F64), old, -torch.ones(1, dtype=F64),
                       torch.ones(1, 2))
    assert loss == pytest.approx(math.exp(-0.1))
    torch.testing.assert_close(g, torch.tensor([[0.0, math.exp(-0.1) / 2]], dtype=F64))
    assert m["clip_frac_low"] == 0.5 and m["clip_frac_high"] == 0.0
    # A = +1 and a token that fell (log r = -0.6): the clip does not hold it (the objective got worse there)
    loss, g, _ = _grad("gmpo", torch.tensor([[-0.6, 0.2]], dtype=F64), old, torch.ones(1, dtype=F64),
                       torch.ones(1, 2))
    assert loss == pytest.approx(-math.exp(-0.2))
    torch.testing.assert_close(g, torch.full((1, 2), -math.exp(-0.2) / 2, dtype=F64))


def test_gmpo_is_a_mean_over_sequences():
    # row 0: one token, log r 0.1, A = 1 -> -e^0.1; row 1: two tokens (0, 0.2), A = -2 -> +2 e^0.1; row 2 empty
    logp = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    loss, _, _ = _grad("gmpo", logp, torch.zeros_like(logp), torch.tensor([1.0, -2.0, 5.0], dtype=F64), mask)
    assert loss == pytest.approx((-math.exp(0.1) + 2 * math.exp(0.1)) / 2)


# --- DPPO -----------------------------------------------------------------------------------------------


def _dppo(algo, p, p_old, a, **kw):
    logp, old = torch.log(torch.tensor([[p]], dtype=F64)), torch.log(torch.tensor([[p_old]], dtype=F64))
    return _grad(algo, logp, old, torch.tensor([a], dtype=F64), torch.ones(1, 1), **kw)


def test_dppo_tv_masks_a_token_that_moved_too_far_its_advantages_way():
    # p_old 0.5 -> p 0.6 (TV 0.1 <= 0.15), A = +1: kept; r = 1.2, loss -A sg[r] log p = -1.2 log 0.6, d/dlogp -1.2
    loss, g, m = _dppo("dppo_tv", 0.6, 0.5, 1.0)
    assert loss == pytest.approx(-1.2 * math.log(0.6)) and g.item() == pytest.approx(-1.2)
    assert m["clip_frac_high"] == 0.0
    # p 0.7 (TV 0.2 > 0.15), A = +1: masked, no loss and no gradient
    loss, g, m = _dppo("dppo_tv", 0.7, 0.5, 1.0)
    assert loss == 0.0 and g.item() == 0.0 and m["clip_frac_high"] == 1.0
    # p 0.3 (down by 0.2), A = +1: the mask is one-sided, the token is kept: r = 0.6, d/dlogp = -0.6
    loss, g, _ = _dppo("dppo_tv", 0.3, 0.5, 1.0)
    assert loss == pytest.approx(-0.6 * math.log(0.3)) and g.item() == pytest.approx(-0.6)
    # the same token with A = -1 moved too far down: masked
    loss, g, m = _dppo("dppo_tv", 0.3, 0.5, -1.0)
    assert g.item() == 0.0 and m["clip_frac_low"] == 1.0


def test_dppo_lets_a_rare_token_rise_that_ppo_would_clip():
    # p_old 1e-5 -> p 1e-3: r = 100, but TV moved only 1e-3; A = +1: gradient -r = -100 (PPO's clip: 0)
    _, g, m = _dppo("dppo_tv", 1e-3, 1e-5, 1.0)
    assert g.item() == pytest.approx(-100.0) and m["clip_frac_high"] == 0.0
    _, g_ppo, _ = _dppo("ppo", 1e-3, 1e-5, 1.0)
    assert g_ppo.item() == 0.0
    # ratio_cap 20 truncates the weight (verl's clip_ratio_c): gradient -20
    _, g, m = _dppo("dppo_tv", 1e-3, 1e-5, 1.0, ratio_cap=20.0)
    assert g.item() == pytest.approx(-20.0) and m["cap_frac"] == 1.0
    # a high-probability token falling 0.99 -> 0.8 (ratio 0.81, inside PPO's clip) with A < 0 is masked
    _, g, m = _dppo("dppo_tv", 0.8, 0.99, -1.0)
    assert g.item() == 0.0 and m["clip_frac_low"] == 1.0
    _, g_ppo, _ = _dppo("ppo", 0.8, 0.99, -1.0)
    assert g_ppo.item() != 0.0


def test_dppo_kl_uses_the_binary_kl():
    # D(0.5 || 0.7) = 0.5 log(0.5/0.7) + 0.5 log(0.5/0.3) = 0.08718 > 0.05: masked for A > 0
    div = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert binary_kl(torch.tensor(math.log(0.5), dtype=F64), torch.tensor(math.log(0.7), dtype=F64)).item() == \
        pytest.approx(div, rel=1e-7)
    _, g, m = _dppo("dppo_kl", 0.7, 0.5, 1.0)
    assert g.item() == 0.0 and m["clip_frac_high"] == 1.0
    # D(0.5 || 0.6) = 0.5 log(0.5/0.6) + 0.5 log(0.5/0.4) = 0.02041 <= 0.05: kept, d/dlogp = -r = -1.2
    _, g, _ = _dppo("dppo_kl", 0.6, 0.5, 1.0)
    assert g.item() == pytest.approx(-1.2)
    # the bound on the other side: 0.5 -> 0.3 is D = 0.08718 too, masked for A < 0 only
    assert _dppo("dppo_kl", 0.3, 0.5, -1.0)[1].item() == 0.0
    assert _dppo("dppo_kl", 0.3, 0.5, 1.0)[1].item() == pytest.approx(-0.6)
    # p = 1 is finite: the eps in the second logarithm (as verl)
    assert torch.isfinite(binary_kl(torch.tensor([-0.1], dtype=F64), torch.tensor([0.0], dtype=F64))).all()
    # a log-prob above 0 (not a probability) gives a NaN divergence: the token is masked, not kept
    _, g, m = _grad("dppo_kl", torch.tensor([[0.1]], dtype=F64), torch.tensor([[-0.2]], dtype=F64),
                    torch.ones(1, dtype=F64), torch.ones(1, 1))
    assert g.item() == 0.0 and m["clip_frac_high"] == 1.0


# --- Clip-Cov and KL-Cov -----------------------------------------------------------------------------------

# One row of four tokens: log p = (-1, -1, -3, -3) (mean -2), A = (2, -2, 2, -2) (mean 0):
# c_t = (1 * 2, 1 * -2, -1 * 2, -1 * -2) = (2, -2, -2, 2). Tokens 0 and 3 lie in Clip-Cov's band (1, 5).
LOGP = torch.tensor([[-1.0, -1.0, -3.0, -3.0]], dtype=F64)
ADV = torch.tensor([[2.0, -2.0, 2.0, -2.0]], dtype=F64)
MASK = torch.ones(1, 4)


def test_token_covariance_and_metrics_by_hand():
    torch.testing.assert_close(token_covariance(LOGP, ADV, MASK), torch.tensor([[2.0, -2.0, -2.0, 2.0]], dtype=F64))
    m = covariance_metrics(LOGP, ADV, MASK)
    assert m["cov_mean"].item() == 0.0 and m["cov_max"].item() == 2.0
    assert m["cov_band_frac"].item() == 0.5  # tokens 0 and 3 in (1, 5)
    assert m["cov_q99"].item() == pytest.approx(2.0) and m["cov_q999"].item() == pytest.approx(2.0)
    # padding (with -inf log-probs) leaves the statistics of the counted tokens alone
    padded = torch.cat([LOGP, torch.full((1, 2), -math.inf, dtype=F64)], dim=1)
    m2 = covariance_metrics(padded, torch.cat([ADV, torch.zeros(1, 2, dtype=F64)], dim=1),
                            torch.cat([MASK, torch.zeros(1, 2)], dim=1))
    assert {k: v.item() for k, v in m2.items()} == {k: v.item() for k, v in m.items()}
    assert all(v.item() == 0.0 for v in covariance_metrics(LOGP, ADV, torch.zeros(1, 4)).values())


def test_covariance_is_that_of_the_counted_tokens():
    """cov_mean is the (biased, 1/N) covariance of log p and A over the counted tokens."""
    g = torch.Generator().manual_seed(0)
    logp, adv = -torch.rand(3, 5, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    mask = (torch.rand(3, 5, generator=g) < 0.7).to(F64)
    x, y = logp[mask > 0], adv[mask > 0]
    expected = ((x - x.mean()) * (y - y.mean())).mean()
    assert covariance_metrics(logp, adv, mask)["cov_mean"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_clip_cov_detaches_the_chosen_high_covariance_tokens():
    # on-policy (r = 1: nothing clipped by PPO); cov_frac 0.5 -> max(int(0.5 * 4), 1) = 2 tokens of the two
    # candidates: both detached. Token-mean of the rest: (0 + 2 - 2 + 0) / 4 = 0; gradient -A / 4 on tokens 1, 2
    loss, g, m = _grad("clip_cov", LOGP, LOGP.clone(), ADV, MASK, cov_frac=0.5)
    assert loss == 0.0
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.5, -0.5, 0.0]], dtype=F64))
    assert m["cov_detached_frac"] == 0.5
    # cov_frac 0.25 -> 1 token, drawn at random among the two; the generator decides which, reproducibly
    chosen = set()
    for seed in range(8):
        _, g, m = _grad("clip_cov", LOGP, LOGP.clone(), ADV, MASK, cov_frac=0.25,
                        generator=torch.Generator().manual_seed(seed))
        zero = [t for t in range(4) if g[0, t] == 0]
        assert len(zero) == 1 and zero[0] in (0, 3) and m["cov_detached_frac"] == 0.25
        _, g2, _ = _grad("clip_cov", LOGP, LOGP.clone(), ADV, MASK, cov_frac=0.25,
                         generator=torch.Generator().manual_seed(seed))
        assert torch.equal(g, g2)
        chosen.add(zero[0])
    assert chosen == {0, 3}  # both are drawn for some seed
    # a band that holds no token detaches none: PPO's clip alone
    loss, g, m = _grad("clip_cov", LOGP, LOGP.clone(), ADV, MASK, cov_low=3.0, cov_high=5.0)
    assert m["cov_detached_frac"] == 0.0
    assert torch.equal(g, _grad("ppo", LOGP, LOGP.clone(), ADV, MASK, clip_low=1.0, clip_high=1.0)[1])


def test_clip_cov_leaves_tokens_the_clip_already_holds():
    # token 0 (A = 2) at r = e^0.5 > 1 + 0.2 is clipped by PPO: not a candidate, so the draw takes token 3
    logp = LOGP.clone()
    logp[0, 0] += 0.5
    for seed in range(4):
        _, g, m = _grad("clip_cov", logp, LOGP.clone(), ADV, MASK, clip_low=0.2, clip_high=0.2, cov_frac=0.25,
                        generator=torch.Generator().manual_seed(seed))
        assert g[0, 0] == 0.0 and g[0, 3] == 0.0 and g[0, 1] != 0.0  # 0: PPO's clip; 3: the covariance
        assert m["clip_frac_high"] == 0.25 and m["cov_detached_frac"] == 0.25


def test_kl_cov_penalises_the_top_covariance_tokens():
    # r = e^0.1 everywhere (old = log p - 0.1); cov_frac 0.5 -> the 2 largest c_t > 0: tokens 0 and 3.
    # loss = mean_t(-A_t r) + beta (0.1 + 0.1) / 4 = 0 + 0.05 (sum of A is 0);
    # d/dlogp_t = (-A_t r + beta [t in 0, 3]) / 4
    r = math.exp(0.1)
    loss, g, m = _grad("kl_cov", LOGP, LOGP - 0.1, ADV, MASK, cov_frac=0.5, cov_coef=1.0)
    assert loss == pytest.approx(0.05)
    expected = torch.tensor([[-2 * r + 1, 2 * r, -2 * r, 2 * r + 1]], dtype=F64) / 4
    torch.testing.assert_close(g, expected)
    assert m["cov_penalised_frac"] == 0.5 and m["abs_kl"] == pytest.approx(0.1)
    # no clip at all: a ratio of e^1 with A > 0 keeps its gradient
    _, g, _ = _grad("kl_cov", LOGP, LOGP - 1.0, ADV, MASK)
    assert torch.all(g != 0)


@pytest.mark.parametrize("algo", ["clip_cov", "kl_cov"])
def test_equal_advantages_leave_the_covariance_methods_plain(algo, batch):
    """With every advantage equal c_t = 0 exactly (not 1e-17: the mean of equal floats can miss them in the last
    bit): Clip-Cov detaches nothing (0 is outside (1, 5)) and KL-Cov penalises nothing (only c_t > 0 is
    eligible), so the loss is the plain surrogate's."""
    logp, old, _, mask = batch
    adv = torch.full((logp.shape[0],), 0.7, dtype=F64)
    _, m = policy_loss(logp, old, adv, mask, algo=algo)
    assert m["cov_detached_frac" if algo == "clip_cov" else "cov_penalised_frac"] == 0.0


# --- on-policy identities ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["gmpo", "dppo_tv", "dppo_kl", "kl_cov", "gdpo", "rloo", "reinforce_pp",
                                  "reinforce_pp_baseline", "grpo_passk"])
def test_on_policy_gradient_is_plain_policy_gradient(algo, batch):
    """At logp == old_logp each new member's gradient is that of -A log p under its aggregation (GMPO, like
    GSPO, with the per-sequence mean advantage; KL-Cov's |log r| has zero gradient at r = 1)."""
    from gradus.objectives import agg_loss

    logp, _, adv, mask = batch
    _, g, _ = _grad(algo, logp, logp.clone(), adv, mask)
    obj = resolve_objective(algo)
    y = logp.clone().requires_grad_(True)
    plain = agg_loss(-adv[:, None] * y, mask, obj.agg, norm=obj.agg_norm)
    torch.testing.assert_close(g, torch.autograd.grad(plain, y)[0], rtol=1e-12, atol=1e-14)
    assert g.abs().sum() > 0


def test_clip_cov_on_policy_is_plain_except_on_the_detached_tokens(batch):
    logp, _, adv, mask = batch
    from gradus.objectives import agg_loss

    _, g, m = _grad("clip_cov", logp, logp.clone(), adv, mask, cov_frac=0.2, cov_low=0.1,
                    generator=torch.Generator().manual_seed(0))
    y = logp.clone().requires_grad_(True)
    (g_plain,) = torch.autograd.grad(agg_loss(-adv[:, None] * y, mask, "token-mean"), y)
    detached = (g == 0) & (mask > 0)
    assert 0 < detached.sum() and m["cov_detached_frac"] == pytest.approx(detached.sum().item() / mask.sum().item())
    torch.testing.assert_close(g[~detached], g_plain[~detached], rtol=1e-12, atol=1e-14)
