"""Rollout/training mismatch: per-token correction weights and the metrics that measure the gap.

The rollout engine (e.g. vLLM) samples token y_t and reports rollout_logp = log pi_rollout(y_t);
the trainer recomputes train_logp = log pi_train(y_t) under the same (old) weights. Kernels,
precision and batching differ, so the two disagree, and the "on-policy" samples are in fact drawn
from pi_rollout. Per token, with the log-ratio clamped to +-LOG_RATIO_BOUND before exp:

    rho_t = exp(train_logp_t - rollout_logp_t) = pi_train(y_t) / pi_rollout(y_t)
    rho_i = exp(1/|o_i| sum_t log rho_t)   (geometric mean over the row's counted tokens)

A correction is a detached weight w [B, T] that multiplies each token's policy loss
(`objective_loss(..., token_weight=w)`); the aggregation's denominators are left as they are, as
in the papers' formulas, so a rejected token still counts in |o_i| and N_tokens.

- ``none``     w_t = 1
- ``tis``      w_t = min(rho_t, C)                           truncated IS: Yao et al. 2025, "Your
               efficient RL framework secretly brings you off-policy RL training" (C = 2)
- ``seq_tis``  w_it = min(rho_i, C)                          the same on the sequence's geometric mean
- ``mis``      w_t = rho_t if low <= rho_t <= high else 0   masked IS: Liu et al. 2025, "When Speed
               Kills Stability: Demystifying RL collapse from the training-inference mismatch"
- ``seq_mis``  w_it = rho_i if low <= rho_i <= high else 0  a rejected sequence is masked whole
- ``icepop``   M(k) = k if alpha <= k <= beta else 0        Ling Team 2025, "Every Step Evolves:
               Scaling RL for trillion-scale thinking model" (Ring-1T), alpha = 0.5, beta = 5

``mis`` and ``icepop`` are the same function of rho_t; only their published default bands differ
((0.5, 2) and (0.5, 5)). All bounds are inclusive. Padding (mask 0) and rows with no counted
token get weight 0.

Departures: log-ratios are clamped to +-20 (as everywhere in gradus.objectives), so rho is finite
for any finite input; masked positions are zeroed before any arithmetic, so -inf or NaN in the
padding cannot leak into weights or metrics.
"""

from __future__ import annotations

import torch

from gradus.objectives._tensor import (
    LOG_RATIO_BOUND,
    at_least_fp32,
    check_shapes,
    masked_mean,
    masked_min_max,
    row_lengths,
)

CORRECTIONS = ("none", "tis", "mis", "seq_tis", "seq_mis", "icepop")

# (low, high) per mode; None: no bound on that side. Sources in the module docstring.
DEFAULT_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None),
    "tis": (None, 2.0),
    "seq_tis": (None, 2.0),
    "mis": (0.5, 2.0),
    "seq_mis": (0.5, 2.0),
    "icepop": (0.5, 5.0),
}

_TRUNCATING = ("tis", "seq_tis")
_SEQUENCE = ("seq_tis", "seq_mis")


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
        low, high: the band (mis, seq_mis, icepop) or the cap `high` (tis, seq_tis);
            None: DEFAULT_BOUNDS[mode]. `low` is rejected for the truncating modes, both for "none".
    Returns:
        (weights, stats): weights [B, T] in train_logp's dtype (at least fp32), 0 where mask is 0;
        stats 0-dim tensors: weight_mean (over counted tokens), masked_frac (share of counted
        tokens the band set to 0), truncated_frac (share of counted tokens capped by tis/seq_tis).
    """
    low, high = resolve_bounds(mode, low, high)
    log_rho, mask = _log_ratio(train_logp, rollout_logp, loss_mask)  # [B, T], [B, T]
    keep = mask > 0  # [B, T]

    if mode in _SEQUENCE:
        log_seq = log_rho.sum(-1) / row_lengths(mask).clamp(min=1)  # [B]
        rho = torch.exp(log_seq)[:, None].expand_as(mask)  # [B, T]
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
    }
    return weights, stats


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
    return low, high


def _check_band(low: float | None, high: float | None) -> None:
    """`not x > 0` rather than `x <= 0`, so that a NaN bound is refused too."""
    if high is not None and not high > 0:
        raise ValueError(f"high must be positive, got {high}")
    if low is not None and not low > 0:
        raise ValueError(f"low must be positive, got {low}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
