"""The interface between the trainer and whatever samples completions.

The trainer only sees `RolloutEngine`: the in-process `LocalEngine` implements it today; a vLLM
engine or a pool of remote workers can implement it later without the trainer changing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from gradus.rollout.types import RolloutBatch, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples n completions for each prompt (token ids, no padding) and returns them as one batch."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        params: SamplingParams,
        *,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Rows j*n .. j*n+n-1 of the result are the completions of prompts[j]. Completion s of prompts[j]
        depends only on (seeds[j], s) (or (seed, j, s)), never on the rest of the batch."""
        ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy the policy's current weights into the engine (for engines that hold their own copy)."""
        ...
