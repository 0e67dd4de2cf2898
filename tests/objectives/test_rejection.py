"""Rejection of tokens and sequences by a divergence statistic (verl 0.9's rollout_rs): hand-worked masks
and metrics, a loop oracle for every criterion and for combinations, the config's threshold syntax, errors."""

import math

import pytest
import torch

from gradus.objectives import REJECTIONS, Rejection, rejection_mask, resolve_rejection

F64 = torch.float64
L2 = math.log(2)


def _example():
    # row 0: rho = (0.5, 2, 4); row 1: rho = 0.25, then padding reported as -inf (must not leak); row 2 empty
    train = torch.log(torch.tensor([[0.5, 2.0, 4.0], [0.25, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64))
    rollout = torch.zeros_like(train)
    rollout[1, 1:] = -math.inf
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    return train, rollout, mask


# per token: log rho = (-l2, l2, 2 l2 | -2 l2)
# k2 = (log rho)^2 / 2 = (l2^2/2, l2^2/2, 2 l2^2 | 2 l2^2) = (0.2402, 0.2402, 0.9609 | 0.9609)
# k3 = rho - 1 - log rho = (l2 - 0.5, 1 - l2, 3 - 2 l2 | 2 l2 - 0.75) = (0.1931, 0.3069, 1.6137 | 0.6363)
HAND = [  # (criteria, kept [row 0's three tokens, row 1's token], rejected rows of the 2 non-empty)
    ([Rejection("token_k1", 0.5, 2.0)], [1, 1, 0, 0], 2),  # edges 0.5 and 2 kept, 4 and 0.25 not
    ([Rejection("token_k1", 0.25, 4.0)], [1, 1, 1, 1], 0),  # inclusive at both ends
    ([Rejection("seq_sum_k1", 0.5, 2.0)], [0, 0, 0, 0], 2),  # products 4 and 0.25
    ([Rejection("seq_sum_k1", 0.2, 4.0)], [1, 1, 1, 1], 0),
    ([Rejection("seq_mean_k1", 0.5, 2.0)], [1, 1, 1, 0], 1),  # geometric means 2^(2/3) and 0.25
    ([Rejection("token_k2", None, 0.5)], [1, 1, 0, 0], 2),
    ([Rejection("token_k3", None, 0.5)], [1, 1, 0, 0], 2),
    ([Rejection("seq_sum_k3", None, 2.0)], [0, 0, 0, 1], 1),  # sums 3.5 - 2 l2 = 2.1137 and 0.6363
    ([Rejection("seq_mean_k3", None, 0.7)], [0, 0, 0, 1], 1),  # means 0.7046 and 0.6363
    ([Rejection("seq_mean_k2", None, 0.5)], [1, 1, 1, 0], 1),  # means l2^2 = 0.4805 and 0.9609
    ([Rejection("seq_max_k2", None, 1.0)], [1, 1, 1, 1], 0),  # maxima 0.9609 and 0.9609
    ([Rejection("seq_max_k2", None, 0.9)], [0, 0, 0, 0], 2),
    ([Rejection("seq_max_k3", None, 1.0)], [0, 0, 0, 1], 1),  # maxima 1.6137 and 0.6363
    ([Rejection("token_k1", 0.5, 2.0), Rejection("seq_max_k3", None, 1.0)], [0, 0, 0, 0], 2),  # both must pass
    ([Rejection("seq_mean_k1", 0.5, 2.0), Rejection("seq_max_k2", None, 1.0)], [1, 1, 1, 0], 1),
]


@pytest.mark.parametrize(("criteria", "kept", "rows"), HAND, ids=lambda x: str(x))
def test_masks_by_hand(criteria, kept, rows):
    keep, stats = rejection_mask(*_example(), criteria)
    expected = torch.zeros(3, 3, dtype=F64)
    expected[0] = torch.tensor(kept[:3], dtype=F64)
    expected[1, 0] = kept[3]
    assert torch.equal(keep, expected)
    assert stats["rejected_frac"].item() == pytest.approx(kept.count(0) / 4)
    assert stats["seq_rejected_frac"].item() == pytest.approx(rows / 2)


def test_statistics_by_hand():
    train, rollout, mask = _example()
    _, s = rejection_mask(train, rollout, mask, [Rejection("token_k1", 0.5, 2.0), Rejection("seq_sum_k3", None, 2.0),
                                                 Rejection("seq_mean_k1", 0.5, 2.0)])
    # token_k1: log rho over the 4 counted tokens: (-l2 + l2 + 2 l2 - 2 l2) / 4 = 0; max 2 l2; rejects 4 and 0.25
    assert s["token_k1_mean"].item() == pytest.approx(0.0, abs=1e-15)
    assert s["token_k1_max"].item() == pytest.approx(2 * L2)
    assert s["token_k1_rejected_frac"].item() == 0.5 and s["token_k1_seq_rejected_frac"].item() == 1.0
    # seq_sum_k3: row sums 3.5 - 2 l2 (on 3 tokens) and 2 l2 - 0.75 (on 1): token-weighted mean, max over rows
    assert s["seq_sum_k3_mean"].item() == pytest.approx((3 * (3.5 - 2 * L2) + 2 * L2 - 0.75) / 4)
    assert s["seq_sum_k3_max"].item() == pytest.approx(3.5 - 2 * L2)
    assert s["seq_sum_k3_rejected_frac"].item() == 0.75 and s["seq_sum_k3_seq_rejected_frac"].item() == 0.5
    # seq_mean_k1: mean log rho per row: 2 l2 / 3 and -2 l2; the 0.25 row is rejected
    assert s["seq_mean_k1_mean"].item() == pytest.approx((3 * 2 * L2 / 3 - 2 * L2) / 4, abs=1e-15)
    assert s["seq_mean_k1_max"].item() == pytest.approx(2 * L2 / 3)
    assert s["seq_mean_k1_rejected_frac"].item() == 0.25
    # all three: row 0 fails token_k1 (token 3) and seq_sum_k3, row 1 fails token_k1 and seq_mean_k1
    assert s["rejected_frac"].item() == 1.0 and s["seq_rejected_frac"].item() == 1.0


def test_no_mismatch_keeps_everything(batch):
    _, old, _, mask = batch
    every = [Rejection(n, 0.999, 1.001) if n.endswith("k1") else Rejection(n, None, 1e-12) for n in REJECTIONS]
    keep, stats = rejection_mask(old, old.clone(), mask, every)
    assert torch.equal(keep, mask)
    assert all(v.item() == 0.0 for v in stats.values())


def test_nothing_counted_gives_zeros():
    x = torch.zeros(2, 3, dtype=F64)
    keep, stats = rejection_mask(x, x + 1.0, torch.zeros(2, 3), [Rejection("seq_max_k3", None, 0.1)])
    assert torch.equal(keep, torch.zeros(2, 3, dtype=F64))
    assert all(v.item() == 0.0 for v in stats.values())


# --- the loop oracle ------------------------------------------------------------------------------


def _loop(train, rollout, mask, criteria):
    """Element by element from the module docstring, in Python floats."""
    B, T = train.shape
    keep = [[float(mask[i, t] > 0) for t in range(T)] for i in range(B)]
    for c in criteria:
        level, _, kind = c.name.rpartition("_")
        for i in range(B):
            toks = [t for t in range(T) if mask[i, t] > 0]
            logs = [float(train[i, t]) - float(rollout[i, t]) for t in toks]
            div = {"k1": lambda x: x, "k2": lambda x: x * x / 2, "k3": lambda x: math.exp(x) - 1 - x}[kind]
            values = [div(x) for x in logs]

            def ok(v, kind=kind, c=c):
                return math.exp(v) >= c.low and math.exp(v) <= c.high if kind == "k1" else v <= c.high

            if level == "token":
                verdicts = {t: ok(v) for t, v in zip(toks, values, strict=True)}
            else:
                stat = {"seq_sum": sum, "seq_mean": lambda v: sum(v) / len(v), "seq_max": max}[level](values) \
                    if values else 0.0
                verdicts = dict.fromkeys(toks, ok(stat))
            for t, good in verdicts.items():
                if not good:
                    keep[i][t] = 0.0
    return torch.tensor(keep, dtype=F64)


def _random(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 9
    train = -torch.rand(B, T, generator=g, dtype=F64) * 4
    shift = 0.2 * torch.randn(B, 1, generator=g, dtype=F64)  # [B, 1] so that sequence statistics spread too
    rollout = train + 0.3 * torch.randn(B, T, generator=g, dtype=F64) + shift / 9
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    mask[0] = 0
    mask[1, 0] = 1
    rollout[mask == 0] = -math.inf
    return train, rollout, mask


BANDS = {"token_k1": (0.7, 1.4), "seq_sum_k1": (0.5, 1.6), "seq_mean_k1": (0.9, 1.1), "token_k2": (None, 0.05),
         "token_k3": (None, 0.05), "seq_sum_k2": (None, 0.2), "seq_sum_k3": (None, 0.2), "seq_mean_k2": (None, 0.04),
         "seq_mean_k3": (None, 0.04), "seq_max_k2": (None, 0.15), "seq_max_k3": (None, 0.15)}


@pytest.mark.parametrize("name", REJECTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_criterion_against_loop(name, seed):
    train, rollout, mask = _random(seed)
    c = Rejection(name, *BANDS[name])
    keep, stats = rejection_mask(train, rollout, mask, [c])
    expected = _loop(train, rollout, mask, [c])
    assert torch.equal(keep, expected)
    n = mask.sum().item()
    assert stats[f"{name}_rejected_frac"].item() == pytest.approx((mask - expected).sum().item() / n)
    rejected_rows = sum(bool(((mask[i] > 0) & (expected[i] == 0)).any()) for i in range(mask.shape[0]))
    assert stats[f"{name}_seq_rejected_frac"].item() == pytest.approx(rejected_rows / (mask.sum(-1) > 0).sum().item())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bands_cut_somewhere_and_not_everywhere(seed):
    """The oracle comparison above is not vacuous: across seeds every criterion keeps some tokens and
    rejects some."""
    for name in REJECTIONS:
        fractions = [rejection_mask(*_random(s), [Rejection(name, *BANDS[name])])[1]["rejected_frac"].item()
                     for s in (0, 1, 2)]
        assert 0 < max(fractions) and min(fractions) < 1, name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_combined_criteria_against_loop(seed):
    train, rollout, mask = _random(seed)
    criteria = [Rejection("token_k1", *BANDS["token_k1"]), Rejection("seq_mean_k3", *BANDS["seq_mean_k3"]),
                Rejection("seq_max_k2", *BANDS["seq_max_k2"])]
    keep, _ = rejection_mask(train, rollout, mask, criteria)
    assert torch.equal(keep, _loop(train, rollout, mask, criteria))
    each = [rejection_mask(train, rollout, mask, [c])[0] for c in criteria]
    assert torch.equal(keep, each[0] * each[1] * each[2])  # a token is kept when every criterion keeps it


def test_mask_is_detached_and_in_train_dtype(batch):
    _, old, _, mask = batch
    train = old.clone().requires_grad_(True)
    keep, stats = rejection_mask(train, old + 0.1, mask, [Rejection("token_k3", None, 0.01)])
    assert not keep.requires_grad and keep.dtype == F64
    keep, _ = rejection_mask(old.to(torch.bfloat16), old, mask, [Rejection("token_k3", None, 0.01)])
    assert keep.dtype == torch.float32


# --- the config's syntax and the checks ------------------------------------------------------------


@pytest.mark.parametrize(("names", "thresholds", "expected"), [
    ("none", None, ()),
    ("", None, ()),
    ("seq_mean_k3", None, (Rejection("seq_mean_k3", None, 0.01),)),  # verl's decoupled_k3_rs
    ("seq_sum_k1", None, (Rejection("seq_sum_k1", 0.5, 2.0),)),  # verl's decoupled_seq_is_rs
    ("seq_mean_k1", None, (Rejection("seq_mean_k1", 0.999, 1.001),)),  # verl's decoupled_geo_rs
    ("token_k1, seq_max_k3", "0.8_1.25,0.5", (Rejection("token_k1", 0.8, 1.25), Rejection("seq_max_k3", None, 0.5))),
    ("token_k1", "2", (Rejection("token_k1", 0.5, 2.0),)),  # one number for k1: [1/x, x]
    ("token_k2,seq_sum_k3", "0.1", (Rejection("token_k2", None, 0.1), Rejection("seq_sum_k3", None, 0.1))),
])
def test_resolve_rejection(names, thresholds, expected):
    assert resolve_rejection(names, thresholds) == expected


@pytest.mark.parametrize(("names", "thresholds", "match"), [
    ("token_k4", None, r"unknown rejection criterion 'token_k4'; valid: token_k1, token_k2"),
    ("seq_max_k1", None, r"unknown rejection criterion 'seq_max_k1'"),  # a max of log-ratios is no divergence
    ("token_k1,token_k1", None, r"listed twice"),
    ("token_k2", None, r"^token_k2 has no default threshold: give one per criterion"),
    ("token_k1,token_k2", "0.5_2,0.1,0.2", r"3 thresholds for 2 rejection criteria"),
    ("token_k2", "0.1_0.2", r"^token_k2: threshold '0.1_0.2' must be one number \(an upper bound\)"),
    ("token_k3", "big", r"not a number"),
    ("seq_mean_k3", "0", r"^seq_mean_k3: the upper bound must be positive"),
    ("token_k1", "1.5_2", r"^token_k1: the band must be such that low <= 1 <= high, got \[1.5, 2.0\]: an on-policy"),
    ("seq_sum_k1", "0.5", r"low \(2.0\) must not exceed high \(0.5\)"),
    ("none", "0.1", r"thresholds given without a rejection criterion"),
])
def test_bad_rejection_is_named(names, thresholds, match):
    with pytest.raises(ValueError, match=match):
        resolve_rejection(names, thresholds)


def test_a_criterion_checks_its_bounds():
    with pytest.raises(ValueError, match="only an upper bound"):
        Rejection("token_k3", 0.5, 2.0)
    with pytest.raises(ValueError, match="needs a positive lower ratio bound"):
        Rejection("seq_mean_k1", None, 2.0)
    with pytest.raises(ValueError, match="must be positive"):
        Rejection("seq_max_k2", None, float("nan"))
