"""DAPO's reward shaping and batch filtering (Yu et al. 2025, sections 3.2 and 3.4)."""

from __future__ import annotations

import torch

from gradus.objectives._tensor import at_least_fp32


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment R_length, added to the task reward. [N] -> [N]

        R = 0                                   if L <= max_len - cache_len
          = ((max_len - cache_len) - L) / cache_len   if max_len - cache_len < L <= max_len
          = -1                                  if L > max_len
    """
    if cache_len <= 0 or cache_len > max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    length = lengths.to(torch.float64)  # [N] exact for any integer length
    start = float(max_len - cache_len)
    ramp = (start - length) / cache_len  # [N]
    penalty = torch.where(length <= start, torch.zeros_like(ramp), ramp)  # [N]
    penalty = torch.where(length > max_len, torch.full_like(ramp, -1.0), penalty)  # [N]
    return penalty.to(torch.float32)


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: True for each group whose rewards are not all equal. [N] -> [N / G]

    The seed's constraint 0 < |{o_i : correct}| < G, generalised to any reward: a group whose
    rewards are all equal has all-zero group-normalised advantages and so no gradient.
    """
    groups = _grouped(at_least_fp32(rewards), group_size)  # [N/G, G]
    return groups.amax(dim=1) != groups.amin(dim=1)  # [N/G]


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape rewards laid out group by group into [N / G, G], checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"{rewards.shape[0]} rewards cannot be split into groups of {group_size}")
    return rewards.view(-1, group_size)
