"""PPO's clipped value loss (Schulman et al. 2017; the clipped form of OpenAI baselines / verl):

    l_t = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)
"""

from __future__ import annotations

import torch

from gradus.objectives._tensor import at_least_fp32, check_shapes, masked_mean
from gradus.objectives.aggregation import agg_loss


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss over counted tokens; clip=None gives the plain squared error. [B, T] -> scalar"""
    check_shapes("values", values, old_values=old_values, returns=returns, loss_mask=loss_mask)
    values = at_least_fp32(values)
    old_values = at_least_fp32(old_values).detach().to(values.dtype)
    returns = at_least_fp32(returns).detach().to(values.dtype)
    mask = loss_mask.to(values.dtype)
    unclipped = (values - returns).square()  # [B, T]
    if clip is None:
        loss_mat = 0.5 * unclipped
        clipped_more = torch.zeros_like(unclipped)
    else:
        if clip <= 0:
            raise ValueError(f"value clip must be positive or None, got {clip}")
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)  # [B, T]
        clipped = (v_clipped - returns).square()  # [B, T]
        loss_mat = 0.5 * torch.maximum(unclipped, clipped)  # [B, T]
        clipped_more = (clipped > unclipped).to(values.dtype)
    loss = agg_loss(loss_mat, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        err = (returns - values.detach()) * mask
        ret_var = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
        metrics = {
            "value_clip_frac": masked_mean(clipped_more, mask),
            "value_mean": masked_mean(values.detach(), mask),
            "return_mean": masked_mean(returns, mask),
            "explained_var": 1.0 - masked_mean((err - masked_mean(err, mask)).square(), mask)
            / ret_var.clamp(min=1e-8),
        }
    return loss, {k: float(v) for k, v in metrics.items()}
