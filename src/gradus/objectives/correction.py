"""Rollout/training mismatch: per-token correction weights and the metrics that measure the gap.

The rollout engine (e.g. vLLM) samples token y_t and reports rollout_logp = log pi_rollout(y_t);
the trainer recomputes train_logp = log pi_train(y_t) under the same (old) weights. Kernels,
precision and batching differ, so the two disagree, and the "on-policy" samples are in fact drawn
from pi_rollout. Per token and per sequence, with each log-ratio clamped to +-LOG_RATIO_BOUND:

    rho_t = exp(train_logp_t - rollout_logp_t) = pi_train(y_t) / pi_rollout(y_t)
    rho_i = exp(sum_t log rho_t)          the sequence's likelihood ratio, prod_t rho_t
    g_i   = exp(1/|o_i| sum_t log rho_t)  its geometric mean per token (clamped to +-20 after the sum)

A correction is a detached weight w [B, T] that multiplies each token's policy loss
(`objective_loss(..., token_weight=w)`); the aggregation's denominators are left as they are, as
in the papers' formulas, so a zero-weight token still counts in |o_i| and N_tokens.

- ``none``          w_t = 1
- ``tis``           w_t = min(rho_t, C)                          truncated IS: Yao et al. 2025, "Your
                    efficient RL framework secretly brings you off-policy RL training" (C = 2)
- ``mis``           w_t = rho_t if low <= rho_t <= high else 0  masked IS: Liu et al. 2025, "When Speed
                    Kills Stability: Demystifying RL collapse from the training-inference mismatch"
- ``icepop``        the same as mis, with Ling Team 2025's band ("Every Step Evolves: Scaling RL for
                    trillion-scale thinking model", Ring-1T): alpha = 0.5, beta = 5
- ``seq_tis``       w_it = min(rho_i, C) on every token of row i   sequence-level TIS, the papers' product
                    (verl 0.9: rollout_is=sequence with a single threshold)
- ``seq_mis``       w_it = rho_i if low <= rho_i <= high else 0    sequence-level MIS: a rejected sequence
                    is masked whole (verl 0.9: rollout_is=sequence with a "low_high" threshold)
- ``seq_mean_tis``  w_it = min(g_i, C)                           the same on the geometric mean: a
- ``seq_mean_mis``  w_it = g_i if low <= g_i <= high else 0      length-normalised variant (the statistic
                    of verl's seq_mean_k1 rejection), not in the papers; gradus' seq modes before 2026

``mis`` and ``icepop`` are the same function of rho_t; only their published default bands differ
((0.5, 2) and (0.5, 5)). All bounds are inclusive. Padding (mask 0) and rows with no counted
token get weight 0. A band must contain 1: on-policy tokens (pi_train = pi_rollout) must keep
their weight 1.

Rejection (`rejection_mask`, verl 0.9's `rollout_rs`): a 0/1 mask from a divergence statistic per
token or per sequence, from log rho_t = train_logp_t - rollout_logp_t (Schulman 2020, "Approximating
KL divergence": k1 = -log rho, k2 = (log rho)^2 / 2, k3 = rho - 1 - log rho, estimates of
KL(pi_rollout || pi_train) on tokens sampled from pi_rollout):

- ``token_k1``     keep token t if low <= rho_t <= high
- ``seq_sum_k1``   keep row i if low <= prod_t rho_t <= high            (rho_i above)
- ``seq_mean_k1``  keep row i if low <= g_i <= high                     (the geometric mean)
- ``token_k2``, ``token_k3``: keep token t if its k2 (k3) <= high
- ``seq_sum_k2|k3``, ``seq_mean_k2|k3``, ``seq_max_k2|k3``: keep row i if the sum (mean, max) over its
  counted tokens of k2 (k3) <= high

A token is kept when every listed criterion keeps it. The k1 bounds are on pi_train / pi_rollout,
like the weights' bands (verl writes them on its reciprocal, exp(k1) = pi_rollout / pi_train: its
"a_b" is low = 1/b, high = 1/a here; a symmetric band reads the same in both).

Departures: log-ratios are clamped to +-20 per token (as everywhere in gradus.objectives), so
every statistic is finite for any finite input (verl clamps the per-token ratio too, and the
sequence sum only after summing unclamped terms: the two agree whenever |log rho_t| <= 20);
masked positions are zeroed before any arithmetic, so -inf or NaN in the padding cannot leak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradus.objectives._tensor import (
    LOG_RATIO_BOUND,
    at_least_fp32,
    check_shapes,
    masked_mean,
    masked_min_max,
    row_lengths,
)

CORRECTIONS = ("none", "tis", "mis", "icepop", "seq_tis", "seq_mis", "seq_mean_tis", "seq_mean_mis")

# (low, high) per mode; None: no bound on that side. Sources in the module docstring (verl 0.9's
# default rollout_is_threshold is 2.0; its sequence-level MIS preset uses 0.5_2.0).
DEFAULT_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None),
    "tis": (None, 2.0),
    "mis": (0.5, 2.0),
    "icepop": (0.5, 5.0),
    "seq_tis": (None, 2.0),
    "seq_mis": (0.5, 2.0),
    "seq_mean_tis": (None, 2.0),
    "seq_mean_mis": (0.5, 2.0),
}

_TRUNCATING = ("tis", "seq_tis", "seq_mean_tis")
_PRODUCT = ("seq_tis", "seq_mis")
_GEOMETRIC = ("seq_mean_tis", "seq_mean_mis")


@torch.no_grad()
def correction_weights(
    train_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str,
    *,
    low: float | None = None,
    high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Detached per-token weights that correct for sampling from pi_rollout instead of pi_train.

    Args:
        train_logp: log pi_train of the sampled tokens under the old weights. [B, T]
        rollout_logp: log pi_rollout of the same tokens, as the engine reported them. [B, T]
        loss_mask: 1 where a token counts. [B, T]
        mode: one of CORRECTIONS.
        low, high: the band (mis, icepop, seq_mis, seq_mean_mis) or the cap `high` (the tis modes);
            None: DEFAULT_BOUNDS[mode]. `low` is rejected for the truncating modes, both for "none".
    Returns:
        (weights, stats): weights [B, T] in train_logp's dtype (at least fp32), 0 where mask is 0;
        stats 0-dim tensors over counted tokens: weight_mean, masked_frac (share the band set to 0),
        truncated_frac (share capped by a tis mode), ess (effective sample size of the weights as a
        share of the tokens, (sum w)^2 / (n sum w^2): 1 when all are equal, 0 when all are 0).
    """
    low, high = resolve_bounds(mode, low, high)
    log_rho, mask = _log_ratio(train_logp, rollout_logp, loss_mask)  # [B, T], [B, T]
    keep = mask > 0  # [B, T]

    if mode in _PRODUCT or mode in _GEOMETRIC:
        log_seq = log_rho.sum(-1)  # [B]
        if mode in _GEOMETRIC:
            log_seq = log_seq / row_lengths(mask).clamp(min=1)  # [B]
        rho = torch.exp(log_seq.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))[:, None].expand_as(mask)  # [B, T]
    else:
        rho = torch.exp(log_rho)  # [B, T]

    truncated = torch.zeros_like(keep)  # [B, T]
    rejected = torch.zeros_like(keep)  # [B, T]
    if mode == "none":
        weights = torch.ones_like(rho)  # [B, T]
    elif mode in _TRUNCATING:
        truncated = rho > high
        weights = rho.clamp(max=high)  # [B, T]
    else:
        rejected = (rho < low) | (rho > high)
        weights = torch.where(rejected, torch.zeros_like(rho), rho)  # [B, T]
    weights = torch.where(keep, weights, torch.zeros_like(weights))  # [B, T]

    stats = {
        "weight_mean": masked_mean(weights, mask),
        "masked_frac": masked_mean(rejected.to(mask.dtype), mask),
        "truncated_frac": masked_mean(truncated.to(mask.dtype), mask),
        "ess": effective_sample_size(weights, mask),
    }
    return weights, stats


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of `weights` over counted entries, as a share of their number:
    (sum w)^2 / (n sum w^2) = 1 / mean((w / mean w)^2), verl's rollout_is_eff_sample_size. 0 when
    every weight (or nothing) is counted as 0. -> []"""
    w = torch.where(mask > 0, weights, torch.zeros_like(weights))  # [B, T]
    square_sum = w.square().sum()
    n = mask.sum()
    tiny = torch.finfo(w.dtype).tiny
    ratio = w.sum().square() / (n * square_sum).clamp(min=tiny)
    return torch.where(square_sum > 0, ratio, torch.zeros_like(square_sum))


# ---- rejection ------------------------------------------------------------------------------------

REJECTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
              "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")

# Thresholds where verl 0.9 publishes one (its RolloutCorrectionConfig presets): decoupled_seq_is_rs
# (seq_sum_k1 0.5_2.0), decoupled_geo_rs (seq_mean_k1 0.999_1.001), decoupled_k3_rs (seq_mean_k3 0.01);
# token_k1 takes mis' band. The others have no published value and must be given.
DEFAULT_REJECTION_BOUNDS: dict[str, tuple[float | None, float]] = {
    "token_k1": (0.5, 2.0),
    "seq_sum_k1": (0.5, 2.0),
    "seq_mean_k1": (0.999, 1.001),
    "seq_mean_k3": (None, 0.01),
}


@dataclass(frozen=True)
class Rejection:
    """One rejection criterion: its name (a key of REJECTIONS) and bounds. k1 criteria keep a ratio in
    [low, high] (both set, low <= 1 <= high); k2 and k3 criteria keep a divergence <= high (low is None)."""

    name: str
    low: float | None
    high: float

    def __post_init__(self) -> None:
        if self.name not in REJECTIONS:
            raise ValueError(f"unknown rejection criterion {self.name!r}; valid: {', '.join(REJECTIONS)}")
        if not self.high > 0:
            raise ValueError(f"{self.name}: the upper bound must be positive, got {self.high}")
        if self.name.endswith("k1"):
            if self.low is None or not self.low > 0:
                raise ValueError(f"{self.name}: a k1 criterion needs a positive lower ratio bound, got {self.low}")
            if self.low > self.high:
                raise ValueError(f"{self.name}: low ({self.low}) must not exceed high ({self.high})")
            if not self.low <= 1.0 <= self.high:
                raise ValueError(f"{self.name}: the band must be such that low <= 1 <= high, got [{self.low}, "
                                 f"{self.high}]: an on-policy token (pi_train = pi_rollout) would be rejected")
        elif self.low is not None:
            raise ValueError(f"{self.name}: a k2/k3 criterion has only an upper bound (the divergence is >= 0), "
                             f"got low={self.low}")


def resolve_rejection(names: str | None, thresholds: str | None = None) -> tuple[Rejection, ...]:
    """Criteria from a config's comma-separated names (None or "none" for none) and thresholds: one entry per name
    (or one for all), each "high", or "low_high" for a k1 criterion ("x" alone for k1 means [1/x, x]);
    None: DEFAULT_REJECTION_BOUNDS. ValueError names the criterion and what to give."""
    listed = [n.strip() for n in (names or "").split(",") if n.strip()]
    if listed in ([], ["none"]):
        if thresholds is not None:
            raise ValueError("rejection thresholds given without a rejection criterion")
        return ()
    unknown = [n for n in listed if n not in REJECTIONS]
    if unknown or len(set(listed)) != len(listed):
        what = f"unknown rejection criterion {unknown[0]!r}" if unknown else "a rejection criterion is listed twice"
        raise ValueError(f"{what}; valid: {', '.join(REJECTIONS)} (comma-separated), or none")
    if thresholds is None:
        missing = [n for n in listed if n not in DEFAULT_REJECTION_BOUNDS]
        if missing:
            raise ValueError(f"{missing[0]} has no default threshold: give one per criterion")
        return tuple(Rejection(n, *DEFAULT_REJECTION_BOUNDS[n]) for n in listed)
    specs = [s.strip() for s in str(thresholds).split(",")]
    if len(specs) == 1:
        specs = specs * len(listed)
    if len(specs) != len(listed):
        raise ValueError(f"{len(specs)} thresholds for {len(listed)} rejection criteria: give one per criterion, "
                         "or one for all")
    return tuple(_parse_threshold(n, s) for n, s in zip(listed, specs, strict=True))


def _parse_threshold(name: str, spec: str) -> Rejection:
    try:
        parts = [float(x) for x in spec.split("_")]
    except ValueError:
        raise ValueError(f"{name}: threshold {spec!r} is not a number (or low_high for a k1 criterion)") from None
    if len(parts) > 2 or (len(parts) == 2 and not name.endswith("k1")):
        raise ValueError(f"{name}: threshold {spec!r} must be one number" + (" or low_high" if name.endswith("k1")
                                                                             else " (an upper bound)"))
    if name.endswith("k1"):
        low, high = (parts[0], parts[1]) if len(parts) == 2 else (1.0 / parts[0] if parts[0] > 0 else 0.0, parts[0])
        return Rejection(name, low, high)
    return Rejection(name, None, parts[0])


@torch.no_grad()
def rejection_mask(
    train_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    criteria: Sequence[Rejection],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Which tokens every criterion keeps (see the module docstring), and the rejection metrics.

    Returns:
        (keep, stats): keep [B, T] 1/0 in train_logp's dtype (at least fp32), 0 on padding. verl
        multiplies its loss mask by this (rejected tokens leave the loss and its denominators).
        stats 0-dim tensors: rejected_frac (share of counted tokens rejected by any criterion),
        seq_rejected_frac (share of non-empty rows with a rejected token) and, per criterion c,
        {c}_rejected_frac, {c}_seq_rejected_frac, {c}_mean (its statistic averaged over counted tokens,
        a row's value on each of its tokens) and {c}_max (over counted tokens, or over non-empty rows
        for a sequence criterion). k1 statistics are the log-ratio log rho (token, sum or mean), the
        others the divergence.
    """
    log_rho, mask = _log_ratio(train_logp, rollout_logp, loss_mask)  # [B, T], [B, T]
    counted = mask > 0  # [B, T]
    rows = row_lengths(mask) > 0  # [B]
    keep = counted.clone()  # [B, T]
    stats: dict[str, torch.Tensor] = {}
    for c in criteria:
        stat, kept = _criterion(c, log_rho, mask)  # [B, T] or [B]
        if stat.dim() == 1:  # a sequence criterion
            kept_tok = kept[:, None] | ~counted  # [B, T] a row's verdict on its tokens
            stat_tok = stat[:, None].expand_as(mask)  # [B, T]
            stats[f"{c.name}_max"] = masked_min_max(stat, rows.to(mask.dtype))[1]
        else:
            kept_tok, stat_tok = kept | ~counted, stat  # [B, T]
            stats[f"{c.name}_max"] = masked_min_max(stat, mask)[1]
        stats[f"{c.name}_mean"] = masked_mean(stat_tok, mask)
        stats[f"{c.name}_rejected_frac"] = masked_mean((~kept_tok).to(mask.dtype), mask)
        stats[f"{c.name}_seq_rejected_frac"] = _rows_rejected(kept_tok, counted, rows, mask.dtype)
        keep &= kept_tok
    stats["rejected_frac"] = masked_mean((counted & ~keep).to(mask.dtype), mask)
    stats["seq_rejected_frac"] = _rows_rejected(keep | ~counted, counted, rows, mask.dtype)
    return keep.to(mask.dtype), stats


def _criterion(c: Rejection, log_rho: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistic, kept) of one criterion: per token [B, T] or per row [B]."""
    level, _, kind = c.name.rpartition("_")  # e.g. ("seq_mean", "k3")
    if kind == "k1":
        token = log_rho  # [B, T] log rho; the k1 estimate is its negative
    elif kind == "k2":
        token = 0.5 * log_rho.square()  # [B, T]
    else:
        token = torch.expm1(log_rho) - log_rho  # [B, T] k3 >= 0
    token = torch.where(mask > 0, token, torch.zeros_like(token))  # [B, T]
    if level == "token":
        stat = token  # [B, T]
    elif level == "seq_sum":
        stat = token.sum(-1)  # [B]
    elif level == "seq_mean":
        stat = token.sum(-1) / row_lengths(mask).clamp(min=1)  # [B]
    else:  # seq_max of a non-negative divergence: 0 for an empty row, as its padding is 0
        stat = token.amax(-1)  # [B]
    if kind == "k1":  # inclusive log-space band on the ratio
        kept = (stat >= math.log(c.low)) & (stat <= math.log(c.high))
    else:
        kept = stat <= c.high
    return stat, kept


def _rows_rejected(kept_tok: torch.Tensor, counted: torch.Tensor, rows: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """Share of non-empty rows with at least one counted token not kept. -> []"""
    hit = (~kept_tok & counted).any(-1)  # [B]
    return masked_mean(hit.to(dtype), rows.to(dtype))


@torch.no_grad()
def mismatch_metrics(
    train_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    low: float = 0.5,
    high: float = 2.0,
) -> dict[str, torch.Tensor]:
    """How far pi_rollout is from pi_train on the sampled tokens, over counted tokens (0-dim tensors).

    With log rho_t = train_logp_t - rollout_logp_t (clamped to +-20) and the tokens sampled from
    pi_rollout, both KL estimates are of KL(pi_rollout || pi_train) (Schulman 2020, "Approximating
    KL divergence"):

    - kl_k1: mean(-log rho_t); unbiased, can be negative on a finite sample.
    - kl_k3: mean(rho_t - 1 - log rho_t); unbiased and >= 0 term by term.
    - p_abs_diff_max, p_abs_diff_mean: of |pi_train(y_t) - pi_rollout(y_t)|.
    - seq_log_ratio_mean: mean over non-empty rows of sum_t log rho_t (the log of the whole
      sequence's ratio); seq_log_ratio_abs_max: max over those rows of its absolute value.
    - token_outside_frac: share of counted tokens with rho_t outside [low, high].

    All are 0 when nothing is counted, never NaN.
    """
    _check_band(low, high)
    log_rho, mask = _log_ratio(train_logp, rollout_logp, loss_mask)  # [B, T], [B, T]
    keep = mask > 0  # [B, T]
    rho = torch.exp(log_rho)  # [B, T]

    dtype = log_rho.dtype
    p_train = torch.exp(at_least_fp32(train_logp.detach()).to(dtype))  # [B, T]
    p_rollout = torch.exp(at_least_fp32(rollout_logp.detach()).to(dtype))  # [B, T]
    p_diff = torch.where(keep, (p_train - p_rollout).abs(), torch.zeros_like(rho))  # [B, T]

    seq_log = log_rho.sum(-1)  # [B]
    seq_mask = (row_lengths(mask) > 0).to(dtype)  # [B]
    outside = ((rho < low) | (rho > high)).to(dtype)  # [B, T]

    metrics = {
        "kl_k1": masked_mean(-log_rho, mask),
        "kl_k3": masked_mean(torch.expm1(log_rho) - log_rho, mask),
        "p_abs_diff_mean": masked_mean(p_diff, mask),
        "seq_log_ratio_mean": masked_mean(seq_log, seq_mask),
        "token_outside_frac": masked_mean(outside, mask),
    }
    metrics["p_abs_diff_max"] = masked_min_max(p_diff, mask)[1]
    metrics["seq_log_ratio_abs_max"] = masked_min_max(seq_log.abs(), seq_mask)[1]
    return metrics


def _log_ratio(
    train_logp: torch.Tensor, rollout_logp: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped log rho, 0 where mask is 0, and the mask in the same dtype. -> [B, T], [B, T]"""
    check_shapes("train_logp", train_logp, rollout_logp=rollout_logp, loss_mask=loss_mask)
    train = at_least_fp32(train_logp.detach())  # [B, T]
    rollout = rollout_logp.detach().to(train.dtype)  # [B, T]
    mask = loss_mask.detach().to(train.dtype)  # [B, T]
    # where() rather than multiply: -inf or NaN reported for padding must not reach the sums.
    log_rho = torch.where(mask > 0, train - rollout, torch.zeros_like(train))  # [B, T]
    return log_rho.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND), mask


def resolve_bounds(mode: str, low: float | None, high: float | None) -> tuple[float | None, float | None]:
    """The mode's (low, high) after defaults, checked; ValueError names the offending argument."""
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown correction mode {mode!r}; valid modes: {', '.join(CORRECTIONS)}")
    if mode == "none" and (low is not None or high is not None):
        raise ValueError("low and high are not used by correction mode 'none'")
    if mode in _TRUNCATING and low is not None:
        raise ValueError(f"low is not used by correction mode {mode!r}, which only caps at high")
    default_low, default_high = DEFAULT_BOUNDS[mode]
    low = default_low if low is None else float(low)
    high = default_high if high is None else float(high)
    _check_band(low, high)
    # the weight of an on-policy token (ratio 1) must stay 1: a band (or cap) that leaves 1 outside
    # would zero (or shrink) every token even when the engines agree exactly
    if mode in _TRUNCATING and high < 1.0:
        raise ValueError(f"high must be >= 1, got {high}: {mode} would cap an on-policy token (pi_train = "
                         "pi_rollout) below weight 1")
    if low is not None and high is not None and not low <= 1.0 <= high:
        raise ValueError(f"the band must be such that low <= 1 <= high, got [{low}, {high}]: an on-policy token "
                         "(pi_train = pi_rollout) would be rejected")
    return low, high


def _check_band(low: float | None, high: float | None) -> None:
    """`not x > 0` rather than `x <= 0`, so that a NaN bound is refused too."""
    if high is not None and not high > 0:
        raise ValueError(f"high must be positive, got {high}")
    if low is not None and not low > 0:
        raise ValueError(f"low must be positive, got {low}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
