"""The interface between the trainer and whatever samples completions.

The trainer and the held-out evaluation only see `RolloutEngine`; the engines are found by name in
`gradus.rollout.registry` (`rollout.engine`). Each says what in a config it cannot run with (`check`, before
any work), what it can do (`records_routing`), and whether it holds weights of its own (`holds_weights`),
which the trainer then refreshes after every update with one call, `sync`, fed by the policy's export of
its full, plain weights (`gradus.runtime.PolicyRuntime.export_weights`: FSDP2 shards gathered, a LoRA adapter
merged). Whether an engine samples from the policy's own module or keeps a copy (another dtype, a sharded
or adapted policy) is the engine's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from gradus.rollout.types import RolloutBatch, SamplingParams

if TYPE_CHECKING:
    from gradus.config import TrainConfig

# (HF parameter name, full tensor) pairs, the form every engine's `sync` takes
Weights = Iterable[tuple[str, torch.Tensor]]


class EngineError(RuntimeError):
    """A rollout engine that cannot start or run here; the message says what to install or change."""


@dataclass(frozen=True)
class PolicySource:
    """What an engine is built from: the policy as this process holds it."""

    module: nn.Module  # the policy's own module (inside DDP); sharded under FSDP2, a PEFT model under LoRA
    sharded: bool  # its weights are shards: it cannot be sampled from as it is
    adapted: bool  # a PEFT model: its forward adds the adapters (the fast decoder needs plain weights)
    dtype: torch.dtype  # its parameters' dtype (model.dtype)
    blueprint: Callable[[torch.dtype], nn.Module]  # a new plain model of its architecture, parameters in dtype
    model_dir: Path  # a folder with its architecture (config.json) and tokenizer; its weights may be older
    export: Callable[[], Weights]  # its current full, plain weights (a collective under FSDP2)


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples n completions for each prompt (token ids, no padding) and returns them as one batch."""

    name: ClassVar[str]
    records_routing: ClassVar[bool]
    """Whether batches carry the experts an MoE model routed each token to (`RolloutBatch.routed_experts`)."""
    holds_weights: bool
    """True: the engine holds its own copy of the policy, refreshed through `sync` after every update;
    False: it samples with the policy's module itself."""

    @classmethod
    def check(cls, cfg: TrainConfig, world: int) -> str | None:
        """Why this engine cannot run `cfg` on `world` processes (decidable from the config alone), or None."""
        ...

    @classmethod
    def check_machine(cls, cfg: TrainConfig, device: torch.device) -> None:
        """Before any work: raise EngineError (what to install) or ConfigError when it cannot run on `device`."""
        ...

    @classmethod
    def max_positions(cls, cfg: TrainConfig) -> int | None:
        """The longest prompt + completion the engine serves as configured (None: the model's positions)."""
        ...

    @classmethod
    def build(cls, cfg: TrainConfig, source: PolicySource, tokenizer: Any, device: torch.device) -> RolloutEngine:
        ...

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

    def sync(self, weights: Weights) -> None:
        """Copy the policy's current weights (HF names, full tensors) into the engine, in memory. The engine
        consumes `weights` to its end (under FSDP2 each item is a collective)."""
        ...

    def follow(self, export: Callable[[], Weights]) -> None:
        """After an update: `sync(export())` when the engine holds weights of its own, else nothing."""
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


class Engine:
    """What every engine has unless it says otherwise: no config it cannot run, nothing to install, the model's
    positions, no routing recorded, no weights of its own, nothing to free between rollouts."""

    name: ClassVar[str]
    records_routing: ClassVar[bool] = False
    holds_weights: bool = False

    @classmethod
    def check(cls, cfg: TrainConfig, world: int) -> str | None:
        return None

    @classmethod
    def check_machine(cls, cfg: TrainConfig, device: torch.device) -> None:
        return None

    @classmethod
    def max_positions(cls, cfg: TrainConfig) -> int | None:
        return None

    def follow(self, export: Callable[[], Weights]) -> None:
        """After an update: an engine with weights of its own wakes up and takes the policy's (`export()`, its
        full plain weights); one that samples with the policy's module itself has nothing to do."""
        if self.holds_weights:
            self.wake_up()
            self.sync(export())

    def sleep(self) -> None:
        """Nothing to free."""

    def wake_up(self) -> None:
        """Nothing to take back."""

    def close(self) -> None:
        """Nothing to shut down."""
