"""DAPO's soft overlong punishment as a reward term (Yu et al. 2025, eq. 13).

The formula is `gradus.objectives.overlong_penalty`; here it is added to task rewards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradus.objectives import overlong_penalty


def with_overlong_penalty(
    rewards: Sequence[float] | torch.Tensor, lengths: torch.Tensor, *, max_len: int, cache_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards + R_length, R_length), both [N] float32; lengths are completion lengths in tokens."""
    penalty = overlong_penalty(lengths.cpu(), max_len=max_len, cache_len=cache_len)  # [N]
    return torch.as_tensor(rewards, dtype=torch.float32) + penalty, penalty
