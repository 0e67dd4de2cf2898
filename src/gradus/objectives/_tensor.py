"""Small tensor helpers shared by the objectives: dtype promotion, shape checks, masked reductions.

Every objective computes in at least fp32: bf16/fp16 inputs are promoted, fp64 stays fp64 (so the
gradient checks in the tests can run in double precision).
"""

from __future__ import annotations

import torch

# Log-ratios are clamped to this bound before exponentiation so that exp() stays finite for any
# finite input (exp(20) ~ 4.9e8). verl clamps at the same value; inside the bound nothing changes.
LOG_RATIO_BOUND = 20.0


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Return `x` as a floating tensor of at least fp32 precision."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def check_shapes(reference: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Raise ValueError naming the argument whose shape differs from `reference`'s."""
    for name, t in others.items():
        if t.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {reference} has shape {tuple(ref.shape)}; "
                "per-token tensors must all be [B, T]"
            )


def per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence advantages [B] to per-token [B, T]; pass [B, T] through."""
    if advantages.dim() == 1:
        if advantages.shape[0] != like.shape[0]:
            raise ValueError(
                f"advantages has {advantages.shape[0]} rows but the token tensors have {like.shape[0]}"
            )
        return advantages[:, None].expand_as(like)  # [B, T]
    check_shapes("logp", like, advantages=advantages)
    return advantages


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` where mask is 1; 0 when nothing is counted (never NaN)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_min_max(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` over counted entries; (0, 0) when nothing is counted."""
    keep = mask > 0
    if not bool(keep.any()):
        zero = x.new_zeros(())
        return zero, zero
    vals = x[keep]
    return vals.min(), vals.max()


def row_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """Number of counted tokens per row. [B, T] -> [B]"""
    return loss_mask.sum(dim=-1)  # [B]
