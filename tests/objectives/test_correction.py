"""Rollout/training mismatch correction: hand-worked weights and metrics, a loop oracle, the
token_weight hook of objective_loss, errors, and detachment."""

import math

import pytest
import torch

from gradus.objectives import (
    CORRECTIONS,
    DEFAULT_BOUNDS,
    PRESETS,
    correction_weights,
    mismatch_metrics,
    objective_loss,
    policy_loss,
    resolve_objective,
)

from . import oracle

F64 = torch.float64


def _logs(ratios):
    """train_logp = log rho, rollout_logp = 0: rho_t equals the given ratios."""
    train = torch.log(torch.tensor(ratios, dtype=F64))
    return train, torch.zeros_like(train)


# --- 1. no mismatch: every mode is the identity --------------------------------------------------


@pytest.mark.parametrize("mode", CORRECTIONS)
@pytest.mark.parametrize("algo", list(PRESETS))
def test_no_mismatch_weights_are_one_and_loss_unchanged(mode, algo, batch):
    logp, old, adv, mask = batch
    w, stats = correction_weights(old, old.clone(), mask, mode)
    assert torch.equal(w, mask)  # exactly 1 on counted tokens, 0 on padding
    assert stats["weight_mean"].item() == 1.0
    assert stats["masked_frac"].item() == 0.0 and stats["truncated_frac"].item() == 0.0
    assert stats["ess"].item() == 1.0

    obj = resolve_objective(algo)
    results = []
    for weight in (None, w):
        x = logp.clone().requires_grad_(True)
        loss, _ = objective_loss(obj, x, old, adv, mask, token_weight=weight, generator=_draw(algo))
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    # policy_loss passes the weight through
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, algo=algo, token_weight=w, generator=_draw(algo))
    assert torch.equal(loss, results[0][0])


def _draw(algo):
    """Clip-Cov's random draw, the same for every call of a test (the other objectives draw nothing)."""
    return torch.Generator().manual_seed(7) if algo == "clip_cov" else None


# --- 2. hand-worked cases ---------------------------------------------------------------------


def test_token_modes_by_hand():
    train, rollout = _logs([[0.25, 1.0, 3.0]])
    mask = torch.ones(1, 3)
    # tis, C = 2: min(rho, 2) = [0.25, 1, 2]; one token of three capped; mean 3.25 / 3
    w, s = correction_weights(train, rollout, mask, "tis")
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 2.0]], dtype=F64), rtol=1e-14, atol=0)
    assert s["truncated_frac"].item() == pytest.approx(1 / 3)
    assert s["masked_frac"].item() == 0.0
    assert s["weight_mean"].item() == pytest.approx(3.25 / 3)
    # ess = (sum w)^2 / (n sum w^2) = 3.25^2 / (3 * (0.0625 + 1 + 4)) = 10.5625 / 15.1875
    assert s["ess"].item() == pytest.approx(10.5625 / 15.1875)
    # mis, [0.5, 2]: 0.25 and 3 are outside -> [0, 1, 0]; two of three masked
    w, s = correction_weights(train, rollout, mask, "mis")
    assert w.tolist() == [[0.0, 1.0, 0.0]]
    assert s["masked_frac"].item() == pytest.approx(2 / 3) and s["truncated_frac"].item() == 0.0
    assert s["weight_mean"].item() == pytest.approx(1 / 3)
    # icepop, [0.5, 5]: only 0.25 is outside -> [0, 1, 3]
    w, s = correction_weights(train, rollout, mask, "icepop")
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 3.0]], dtype=F64), rtol=1e-14, atol=0)
    assert s["masked_frac"].item() == pytest.approx(1 / 3)
    # none: all 1
    w, _ = correction_weights(train, rollout, mask, "none")
    assert w.tolist() == [[1.0, 1.0, 1.0]]
    # tis with a cap of 1.5: [0.25, 1, 1.5]; overriding high
    w, s = correction_weights(train, rollout, mask, "tis", high=1.5)
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 1.5]], dtype=F64), rtol=1e-14, atol=0)
    assert s["truncated_frac"].item() == pytest.approx(1 / 3)
    # mis keeps 1 of 3 at weight 1: ess = 1^2 / (3 * 1) = 1/3 (the zeros count as lost samples)
    assert correction_weights(train, rollout, mask, "mis")[1]["ess"].item() == pytest.approx(1 / 3)


def test_bounds_are_inclusive():
    # rho = 0.5 / 0.25 = 2 and 0.4 / 0.8 = 0.5, both exact in fp64: on the edges of [0.5, 2], kept
    train = torch.log(torch.tensor([[0.5, 0.4]], dtype=F64))
    rollout = torch.log(torch.tensor([[0.25, 0.8]], dtype=F64))
    mask = torch.ones(1, 2)
    w, s = correction_weights(train, rollout, mask, "mis")
    assert w.tolist() == [[2.0, 0.5]] and s["masked_frac"].item() == 0.0
    w, s = correction_weights(train, rollout, mask, "tis")  # rho = 2 = C is not "capped"
    assert w.tolist() == [[2.0, 0.5]] and s["truncated_frac"].item() == 0.0


def _seq_example():
    # row 0: rho = (0.5, 2, 4): product 4; log-mean (-log 2 + log 2 + 2 log 2) / 3 -> g_0 = 2^(2/3) = 1.5874
    # row 1: rho = (0.25) then padding (rollout -inf there: must not leak) -> product = g_1 = 0.25
    # row 2: empty
    train, rollout = _logs([[0.5, 2.0, 4.0], [0.25, 1.0, 1.0], [1.0, 1.0, 1.0]])
    rollout[1, 1:] = -math.inf
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    return train, rollout, mask


def test_sequence_modes_by_hand():
    """seq_tis and seq_mis weight a row by its likelihood ratio prod_t rho_t (Liu et al. 2025, Yao et al.
    2025, verl's rollout_is=sequence)."""
    train, rollout, mask = _seq_example()
    # seq_tis, C = 2: row 0's product 4 is capped to 2 on its 3 tokens; row 1 keeps 0.25 -> 3 of 4 truncated
    w, s = correction_weights(train, rollout, mask, "seq_tis")
    expected = torch.tensor([[2.0] * 3, [0.25, 0, 0], [0, 0, 0]], dtype=F64)
    torch.testing.assert_close(w, expected, rtol=1e-14, atol=0)
    assert s["truncated_frac"].item() == pytest.approx(3 / 4)
    assert s["weight_mean"].item() == pytest.approx(6.25 / 4)
    # ess = 6.25^2 / (4 * (3 * 4 + 0.0625))
    assert s["ess"].item() == pytest.approx(6.25 ** 2 / (4 * 12.0625))
    # seq_tis, C = 5: nothing capped, row 0 at 4
    w, s = correction_weights(train, rollout, mask, "seq_tis", high=5.0)
    assert w[0].tolist() == pytest.approx([4.0] * 3) and s["truncated_frac"].item() == 0.0
    # seq_mis, [0.5, 2]: 4 and 0.25 are both outside: every row masked whole
    w, s = correction_weights(train, rollout, mask, "seq_mis")
    assert w.tolist() == [[0.0] * 3] * 3
    assert s["masked_frac"].item() == 1.0 and s["ess"].item() == 0.0
    # seq_mis, [0.2, 4]: both kept at their products (edges inclusive: 4 is exact in fp64)
    w, s = correction_weights(train, rollout, mask, "seq_mis", low=0.2, high=4.0)
    torch.testing.assert_close(w, torch.tensor([[4.0] * 3, [0.25, 0, 0], [0, 0, 0]], dtype=F64), rtol=1e-14, atol=0)
    assert s["masked_frac"].item() == 0.0
    # seq_mis, [0.5, 5]: row 1 (0.25) masked: 1 of 4 tokens
    w, s = correction_weights(train, rollout, mask, "seq_mis", high=5.0)
    assert w[1].tolist() == [0.0, 0.0, 0.0] and s["masked_frac"].item() == pytest.approx(1 / 4)
    # token-level modes on the same rows: padding with -inf stays 0 and finite
    for mode in CORRECTIONS:
        w, s = correction_weights(train, rollout, mask, mode)
        assert torch.isfinite(w).all() and torch.all(w[mask == 0] == 0)
        assert all(math.isfinite(v.item()) for v in s.values())


def test_geometric_mean_modes_by_hand():
    """seq_mean_tis and seq_mean_mis: the geometric mean g_i = exp(mean_t log rho_t) (gradus' seq modes
    before 2026; the statistic of verl's seq_mean_k1 rejection)."""
    train, rollout, mask = _seq_example()
    g0 = 2.0 ** (2 / 3)
    # seq_mean_tis, C = 2: g_0 = 1.5874 < 2 is kept on all three tokens; g_1 = 0.25 on its one token
    w, s = correction_weights(train, rollout, mask, "seq_mean_tis")
    expected = torch.tensor([[g0] * 3, [0.25, 0, 0], [0, 0, 0]], dtype=F64)
    torch.testing.assert_close(w, expected, rtol=1e-14, atol=0)
    assert s["truncated_frac"].item() == 0.0
    assert s["weight_mean"].item() == pytest.approx((3 * g0 + 0.25) / 4)
    # seq_mean_tis, C = 1.5: row 0 capped to 1.5 on its 3 tokens -> 3 of 4 counted tokens truncated
    w, s = correction_weights(train, rollout, mask, "seq_mean_tis", high=1.5)
    assert w[0].tolist() == [1.5] * 3
    assert s["truncated_frac"].item() == pytest.approx(3 / 4)
    # seq_mean_mis, [0.5, 2]: row 0 kept at 1.5874, row 1 (0.25) masked whole: 1 of 4 tokens
    w, s = correction_weights(train, rollout, mask, "seq_mean_mis")
    expected = torch.tensor([[g0] * 3, [0, 0, 0], [0, 0, 0]], dtype=F64)
    torch.testing.assert_close(w, expected, rtol=1e-14, atol=0)
    assert s["masked_frac"].item() == pytest.approx(1 / 4)
    assert s["weight_mean"].item() == pytest.approx(3 * g0 / 4)
    # seq_mean_mis, [0.2, 1.5]: now row 0 is masked and row 1 kept
    w, s = correction_weights(train, rollout, mask, "seq_mean_mis", low=0.2, high=1.5)
    assert w.tolist() == [[0, 0, 0], [0.25, 0, 0], [0, 0, 0]]
    assert s["masked_frac"].item() == pytest.approx(3 / 4)


def test_metrics_by_hand():
    # row 0: pi_train (0.5, 0.4), pi_rollout (0.25, 0.8) -> rho (2, 0.5)
    # row 1: pi_train 0.8, pi_rollout 0.2 -> rho 4, then padding; row 2 empty
    p_train = torch.tensor([[0.5, 0.4], [0.8, 1.0], [1.0, 1.0]], dtype=F64)
    p_roll = torch.tensor([[0.25, 0.8], [0.2, 1e-9], [1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    m = mismatch_metrics(torch.log(p_train), torch.log(p_roll), mask)
    l2 = math.log(2)
    # k1 = mean(-log rho) = (-log 2 + log 2 - log 4) / 3 = -2 log 2 / 3: negative on a finite sample
    assert m["kl_k1"].item() == pytest.approx(-2 * l2 / 3)
    # k3 = mean(rho - 1 - log rho) = ((1 - log 2) + (-0.5 + log 2) + (3 - 2 log 2)) / 3
    assert m["kl_k3"].item() == pytest.approx((3.5 - 2 * l2) / 3)
    # |p_train - p_rollout| = 0.25, 0.4, 0.6 (the padding's 1 - 1e-9 is not counted)
    assert m["p_abs_diff_max"].item() == pytest.approx(0.6)
    assert m["p_abs_diff_mean"].item() == pytest.approx(1.25 / 3)
    # sum_t log rho: row 0: log 2 - log 2 = 0, row 1: log 4; mean over the 2 non-empty rows: log 2
    assert m["seq_log_ratio_mean"].item() == pytest.approx(l2)
    assert m["seq_log_ratio_abs_max"].item() == pytest.approx(2 * l2)
    # [0.5, 2] inclusive: 2 and 0.5 inside, 4 outside -> 1 of 3
    assert m["token_outside_frac"].item() == pytest.approx(1 / 3)
    # a narrower band: [0.6, 1.9] rejects all three
    m = mismatch_metrics(torch.log(p_train), torch.log(p_roll), mask, low=0.6, high=1.9)
    assert m["token_outside_frac"].item() == pytest.approx(1.0)


def test_nothing_counted_gives_zeros():
    g = torch.Generator().manual_seed(1)
    train, rollout = -torch.rand(2, 3, generator=g, dtype=F64), -torch.rand(2, 3, generator=g, dtype=F64)
    mask = torch.zeros(2, 3)
    for mode in CORRECTIONS:
        w, s = correction_weights(train, rollout, mask, mode)
        assert torch.equal(w, torch.zeros_like(w))
        assert all(v.item() == 0.0 for v in s.values())
    assert all(v.item() == 0.0 for v in mismatch_metrics(train, rollout, mask).values())


# --- 3. the loop oracle -----------------------------------------------------------------------


def _weights_loop(train, rollout, mask, mode, low, high):
    """Element by element from the module docstring's formulas, in Python floats."""
    B, T = train.shape
    w = [[0.0] * T for _ in range(B)]
    masked = truncated = counted = 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        logs = [float(train[i, t]) - float(rollout[i, t]) for t in toks]
        rho_product = math.exp(sum(logs)) if logs else 1.0
        rho_geometric = math.exp(sum(logs) / len(logs)) if logs else 1.0
        for t, lr in zip(toks, logs, strict=True):
            rho = {"seq_tis": rho_product, "seq_mis": rho_product, "seq_mean_tis": rho_geometric,
                   "seq_mean_mis": rho_geometric}.get(mode, math.exp(lr))
            counted += 1
            if mode == "none":
                w[i][t] = 1.0
            elif mode in ("tis", "seq_tis", "seq_mean_tis"):
                w[i][t] = min(rho, high)
                truncated += rho > high
            elif low <= rho <= high:
                w[i][t] = rho
            else:
                masked += 1
    total = sum(sum(row) for row in w)
    squares = sum(x * x for row in w for x in row)
    n = max(counted, 1)
    ess = total * total / (counted * squares) if squares > 0 else 0.0
    return torch.tensor(w, dtype=F64), {"weight_mean": total / n, "masked_frac": masked / n,
                                        "truncated_frac": truncated / n, "ess": ess}


@pytest.mark.parametrize("mode", CORRECTIONS)
@pytest.mark.parametrize("bounds", ["default", "custom"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_against_loop(mode, bounds, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    train = -torch.rand(B, T, generator=g, dtype=F64) * 4
    # per-token noise plus a per-row shift, so that token and sequence ratios both cross the bounds
    shift = 0.4 * torch.randn(B, 1, generator=g, dtype=F64)  # [B, 1]
    rollout = train + 0.6 * torch.randn(B, T, generator=g, dtype=F64) + shift  # [B, T]
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    mask[0] = 0  # an empty row
    mask[1, 0] = 1  # a row with at least one token
    kwargs = {}
    if bounds == "custom" and mode != "none":
        kwargs = {"high": 1.3} if mode.endswith("tis") else {"low": 0.8, "high": 1.3}
    low, high = DEFAULT_BOUNDS[mode]
    low, high = kwargs.get("low", low), kwargs.get("high", high)
    w, stats = correction_weights(train, rollout, mask, mode, **kwargs)
    w_loop, stats_loop = _weights_loop(train, rollout, mask, mode, low, high)
    assert w.dtype == F64 and w.shape == (B, T)
    torch.testing.assert_close(w, w_loop, rtol=1e-12, atol=1e-14)
    for name, value in stats_loop.items():
        assert stats[name].item() == pytest.approx(value, rel=1e-12, abs=1e-14), name
    if kwargs:  # the custom band is narrow: the case must exercise the bounds, not only the identity
        assert stats["masked_frac"] + stats["truncated_frac"] > 0


def _metrics_loop(train, rollout, mask, low, high):
    B, T = train.shape
    k1, k3, p_diff, outside, seq_logs = [], [], [], 0, []
    for i in range(B):
        logs = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            lt, lr = float(train[i, t]), float(rollout[i, t])
            rho = math.exp(lt - lr)
            k1.append(lr - lt)
            k3.append(rho - 1 - (lt - lr))
            p_diff.append(abs(math.exp(lt) - math.exp(lr)))
            outside += not low <= rho <= high
            logs.append(lt - lr)
        if logs:
            seq_logs.append(sum(logs))
    n = len(k1)
    return {"kl_k1": sum(k1) / n, "kl_k3": sum(k3) / n, "p_abs_diff_max": max(p_diff),
            "p_abs_diff_mean": sum(p_diff) / n, "token_outside_frac": outside / n,
            "seq_log_ratio_mean": sum(seq_logs) / len(seq_logs),
            "seq_log_ratio_abs_max": max(abs(x) for x in seq_logs)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_against_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    train = -torch.rand(B, T, generator=g, dtype=F64) * 4
    rollout = train + 0.6 * torch.randn(B, T, generator=g, dtype=F64)  # [B, T]
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    mask[0] = 0
    mask[1, 0] = 1
    rollout[mask == 0] = -math.inf  # padding reported as -inf must not leak
    m = mismatch_metrics(train, rollout, mask, low=0.7, high=1.5)
    expected = _metrics_loop(train, rollout, mask, 0.7, 1.5)
    assert sorted(m) == sorted(expected)
    for name, value in expected.items():
        assert m[name].item() == pytest.approx(value, rel=1e-12, abs=1e-14), name


# --- 4. token_weight in objective_loss ----------------------------------------------------------


@pytest.mark.parametrize("algo", list(PRESETS))
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_token_weight_against_loop(algo, per_token_adv, batch, monkeypatch):
    """Weighted loss = the oracle's per-token losses times w, aggregated with unchanged denominators.

    With per-token advantages GSPO's loss is per sequence, so the weight must multiply the spread
    loss token by token, not the advantages (the two agree only for per-sequence advantages)."""
    logp, old, adv, mask = batch
    if per_token_adv:
        adv = adv[:, None] + 0.5 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    w = torch.rand(logp.shape, generator=torch.Generator().manual_seed(5), dtype=F64) * 2
    obj = resolve_objective(algo)
    x = logp.clone().requires_grad_(True)
    fast, _ = objective_loss(obj, x, old, adv, mask, token_weight=w, generator=_draw(algo))
    (g_fast,) = torch.autograd.grad(fast, x)
    # the oracle builds its per-token loss matrix, then calls agg_loop: weight the matrix there
    real_agg = oracle.agg_loop
    monkeypatch.setattr(oracle, "agg_loop", lambda loss, m, mode, norm=None: real_agg(loss * w, m, mode, norm))
    y = logp.clone().requires_grad_(True)
    slow = oracle.policy_loop(obj, y, old, adv, mask, seed=7)
    (g_slow,) = torch.autograd.grad(slow, y)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algo", list(PRESETS))
def test_constant_token_weight_scales_loss_exactly(algo, batch):
    # c = 0.25 is a power of two, so c * l rounds exactly like l: value and gradient scale by c, bit for bit
    logp, old, adv, mask = batch
    obj = resolve_objective(algo)
    out = []
    for weight in (None, torch.full_like(logp, 0.25)):
        x = logp.clone().requires_grad_(True)
        loss, _ = objective_loss(obj, x, old, adv, mask, token_weight=weight, generator=_draw(algo))
        out.append((loss, torch.autograd.grad(loss, x)[0]))
    assert torch.equal(out[1][0], 0.25 * out[0][0])
    assert torch.equal(out[1][1], 0.25 * out[0][1])


def test_zero_weight_removes_token_but_keeps_denominator():
    # DAPO token-mean, r = 1, A = +1: per-token losses (-1, -1). Weight (1, 0): (-1 + 0) / 2 = -0.5,
    # not -1: the rejected token still counts in N_tokens.
    logp = torch.zeros(1, 2, dtype=F64)
    adv = torch.ones(1, dtype=F64)
    loss, _ = policy_loss(logp, logp.clone(), adv, torch.ones(1, 2), algo="dapo",
                          token_weight=torch.tensor([[1.0, 0.0]]))
    assert loss.item() == -0.5
    # GRPO seq-mean-token-mean, two rows (A = +1, +1), weight 0 on one of row 0's two tokens:
    # row 0: (-1 + 0) / 2 = -0.5, row 1: -1 -> mean -0.75
    logp = torch.zeros(2, 2, dtype=F64)
    loss, _ = policy_loss(logp, logp.clone(), torch.ones(2, dtype=F64), torch.ones(2, 2), algo="grpo",
                          token_weight=torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert loss.item() == -0.75


def test_token_weight_shape_is_checked(batch):
    logp, old, adv, mask = batch
    with pytest.raises(ValueError, match="token_weight"):
        policy_loss(logp, old, adv, mask, algo="grpo", token_weight=torch.ones(logp.shape[0], 1))


# --- 5. errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kwargs", "match"),
    [
        ("is", {}, r"mode 'is'; valid modes: none, tis, mis, icepop, seq_tis, seq_mis, seq_mean_tis, seq_mean_mis"),
        ("tis", {"low": 0.5}, r"^low is not used"),
        ("seq_tis", {"low": 0.5}, r"^low is not used"),
        ("seq_mean_tis", {"low": 0.5}, r"^low is not used"),
        ("none", {"high": 2.0}, r"low and high are not used"),
        ("tis", {"high": 0.0}, r"^high must be positive"),
        ("mis", {"high": -1.0}, r"^high must be positive"),
        ("mis", {"low": 0.0}, r"^low must be positive"),
        ("icepop", {"low": -0.5}, r"^low must be positive"),
        ("mis", {"low": 3.0}, r"^low \(3.0\) must not exceed high \(2.0\)"),
        ("seq_mis", {"low": 1.5, "high": 1.2}, r"^low \(1.5\) must not exceed high"),
        ("mis", {"high": float("nan")}, r"^high must be positive"),
        # a band without 1 would reject every on-policy token; a cap below 1 would shrink each one
        ("icepop", {"low": 1.5, "high": 1.5}, r"^the band must be such that low <= 1 <= high, got \[1.5, 1.5\]: an"),
        ("mis", {"low": 0.2, "high": 0.8}, r"low <= 1 <= high, got"),
        ("seq_mis", {"low": 1.1}, r"low <= 1 <= high, got"),
        ("seq_mean_mis", {"high": 0.9}, r"low <= 1 <= high, got"),
        ("tis", {"high": 0.5}, r"^high must be >= 1, got 0.5: tis would cap an on-policy token"),
        ("seq_tis", {"high": 0.99}, r"must be >= 1"),
    ],
)
def test_bad_arguments_are_named(mode, kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        correction_weights(x, x, torch.ones(2, 3), mode, **kwargs)


def test_shape_mismatch_is_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="^rollout_logp has shape"):
        correction_weights(x, torch.zeros(2, 4), torch.ones(2, 3), "tis")
    with pytest.raises(ValueError, match="^loss_mask has shape"):
        correction_weights(x, x, torch.ones(3, 3), "mis")
    with pytest.raises(ValueError, match="^rollout_logp has shape"):
        mismatch_metrics(x, torch.zeros(3, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="^low must be positive"):
        mismatch_metrics(x, x, torch.ones(2, 3), low=0.0)
    with pytest.raises(ValueError, match="must not exceed"):
        mismatch_metrics(x, x, torch.ones(2, 3), low=2.0, high=1.0)


# --- 6. weights carry no gradient ----------------------------------------------------------------


@pytest.mark.parametrize("mode", CORRECTIONS)
def test_weights_are_detached(mode, batch):
    logp, old, adv, mask = batch
    train = old.clone().requires_grad_(True)
    rollout = (old + 0.1).requires_grad_(True)
    w, stats = correction_weights(train, rollout, mask, mode)
    assert not w.requires_grad and w.grad_fn is None
    assert not any(v.requires_grad for v in stats.values())
    assert not any(v.requires_grad for v in mismatch_metrics(train, rollout, mask).values())
    # a weight that requires grad is still treated as a constant by the loss
    w_grad = w.clone().requires_grad_(True)
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, algo="grpo", token_weight=w_grad)
    loss.backward()
    assert w_grad.grad is None and x.grad is not None


def test_dtype_follows_train_logp():
    x16 = torch.zeros(2, 3, dtype=torch.bfloat16)
    w, _ = correction_weights(x16, torch.zeros(2, 3, dtype=F64), torch.ones(2, 3), "tis")
    assert w.dtype == torch.float32
    w, _ = correction_weights(x16.to(F64), x16, torch.ones(2, 3), "tis")
    assert w.dtype == F64
