"""Sequence-level quantities: GSPO's log s_i and perplexity.

GSPO (Zheng et al. 2025): s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|)
                              = exp(1/|y_i| sum_t log r_it) = PPL_old(y_i) / PPL_theta(y_i),
with PPL(y) = exp(-1/|y| sum_t log P(y_t | y_<t)). (Written without the log, as in some derivations of GSPO,
the identity fails; with the log it is exact.)
"""

from __future__ import annotations

import torch

from gradus.objectives._tensor import at_least_fp32, check_shapes, row_lengths


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log s_i = mean over counted tokens of (logp - old_logp); 0 for an empty row. [B, T] -> [B]"""
    check_shapes("logp", logp, old_logp=old_logp, loss_mask=loss_mask)
    logp = at_least_fp32(logp)
    mask = loss_mask.to(logp.dtype)
    diff = (logp - at_least_fp32(old_logp).to(logp.dtype)) * mask  # [B, T]
    return diff.sum(-1) / row_lengths(mask).clamp(min=1)  # [B]


def perplexity(logp: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """PPL(y) = exp(-1/|y| sum_t log P(y_t | y_<t)); 1 for an empty row. [B, T] -> [B]"""
    check_shapes("logp", logp, loss_mask=loss_mask)
    logp = at_least_fp32(logp)
    mask = loss_mask.to(logp.dtype)
    mean_logp = (logp * mask).sum(-1) / row_lengths(mask).clamp(min=1)  # [B]
    return torch.exp(-mean_logp)
