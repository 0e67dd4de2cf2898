"""The interface between the trainer and whatever samples completions.

The trainer and the held-out evaluation only see `RolloutEngine`. Two implement it: `LocalEngine`
samples with the policy module itself (nothing to synchronise), `VLLMEngine` holds its own copy of
the weights in vLLM, which the trainer refreshes in memory after every update (`load_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from gradus.rollout.types import RolloutBatch, SamplingParams


class EngineError(RuntimeError):
    """A rollout engine that cannot start or run here; the message says what to install or change."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples n completions for each prompt (token ids, no padding) and returns them as one batch."""

    owns_weights: bool
    """True: the engine holds its own copy of the policy, refreshed through `load_weights` after every
    update; False: it samples with the trainer's module itself."""

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
        """Copy the policy's current weights (HF parameter names) into the engine, in memory."""
        ...

    def sleep(self) -> None:
        """Free what the engine holds between rollouts (a GPU KV cache) while the trainer updates."""
        ...

    def wake_up(self) -> None:
        """Take back what `sleep` freed, before the next rollout."""
        ...

    def close(self) -> None:
        """Release the engine (its memory, its processes); it samples no more."""
        ...
