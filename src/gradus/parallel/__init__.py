"""Data-parallel training under torchrun: the process group, the DDP / FSDP2 wrappers, and the few
collectives the trainer needs. Nothing here runs in a single process: every function is the identity
(or a no-op) when torch.distributed is not initialised, so the single-process trainer is unchanged.

How a data-parallel step stays exact (one process on the whole batch and N processes on 1/N of it take
the same optimizer step, up to float rounding):
- the loss of every rank is divided by the global counts (`train.update.agg_counts`), so the SUM of the
  ranks' gradients is the gradient of the whole batch: DDP gets an all-reduce-sum communication hook and
  FSDP2 a gradient divide factor of 1 (both average by default);
- every rank runs the same number of micro-batches (`equal_pieces`), so FSDP2's per-layer all-gathers
  and the single synchronising backward line up; only the last micro-batch's backward synchronises;
- whether a step is skipped (a non-finite loss or gradient anywhere) is agreed on by all ranks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gradus.config import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CollectiveFailed(RuntimeError):
    """A collective of a data-parallel run failed: another rank died, or stayed stuck past run.dist_timeout_s."""


_COLLECTIVE_MARKS = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe")


def collective_failure(err: BaseException, layout: Layout, timeout_s: float) -> CollectiveFailed | None:
    """A readable CollectiveFailed for an error raised by a collective of a torchrun job, or None."""
    if not layout.distributed:
        return None
    text = str(err)
    if not (isinstance(err, dist.DistError) or any(m in text.lower() for m in _COLLECTIVE_MARKS)):
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return CollectiveFailed(
        f"rank {layout.rank} of {dist.get_world_size()}: a collective failed ({first}). Another rank died or was "
        f"stuck for more than run.dist_timeout_s={timeout_s:g} s; torchrun's report names the rank that "
        "failed first. Resume with: torchrun ... -m gradus train --resume RUN_FOLDER")


@dataclass(frozen=True)
class Layout:
    """Where this process sits: rank of world, and its rank on its node (its GPU index)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process group was started by gradus (and is ended by it)

    @property
    def distributed(self) -> bool:
        return active()


# Default process groups that a rollout engine started in this process for itself (vLLM in-process makes a
# one-rank group): they are not a data-parallel job, and gradus must neither wrap nor reduce over them.
_ENGINE_GROUPS: list[object] = []


def engine_started_group() -> None:
    """Record that the current default process group was started by a rollout engine, not by torchrun."""
    _ENGINE_GROUPS.append(dist.group.WORLD)


def active() -> bool:
    """Whether this process is in an initialised process group of a data-parallel job."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return not any(group is dist.group.WORLD for group in _ENGINE_GROUPS)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def setup(device_name: str, timeout_s: float) -> Layout:
    """Join the process group torchrun's environment describes (gloo on CPU, nccl on CUDA), or return
    the single-process layout. An already initialised group (a test, a user's own launcher) is used as is."""
    if active():
        return Layout(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not launched_by_torchrun():
        return Layout()
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if device_name.startswith("cuda:"):
        raise ConfigError(f"run.device={device_name!r}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                          "set run.device=cuda (or auto)")
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={device_name!r} but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Layout(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def teardown(layout: Layout) -> None:
    if layout.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, layout: Layout) -> torch.device:
    """One device per local rank: cuda:LOCAL_RANK under torchrun, the configured device otherwise."""
    if layout.distributed and device.type == "cuda":
        return torch.device("cuda", layout.local_rank)
    return device


def barrier() -> None:
    if active():
        dist.barrier()


# ---- collectives ------------------------------------------------------------------------------------
def global_max(value: int, device: torch.device | str = "cpu") -> int:
    if not active():
        return value
    x = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def global_min(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest of every rank's `value` (itself in one process)."""
    if not active():
        return value
    x = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return int(x.item())


def equal_pieces(pieces: list[torch.Tensor], device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, bool]]:
    """(rows, real) for each micro-batch, padded to the largest count over ranks by repeating the last
    piece with real=False (its forward and backward run, weighted 0), so every rank makes the same calls."""
    count = global_max(len(pieces), device)
    return [(p, True) for p in pieces] + [(pieces[-1], False)] * (count - len(pieces))


def combine_over_ranks(metrics: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
    """Each metric over the ranks that report it: summed for the keys in `summed` (counts, throughput),
    averaged otherwise (identity in one process)."""
    if not active() or dist.get_world_size() == 1:
        return metrics
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, metrics)
    keys = dict.fromkeys(k for m in gathered for k in m)
    total = {k: sum(m[k] for m in gathered if k in m) for k in keys}
    return {k: v if k in summed else v / sum(k in m for m in gathered) for k, v in total.items()}


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (a name, a path: anything picklable); itself in one process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_trainable(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's values of `model`'s trainable parameters (freshly drawn weights, such as LoRA's
    A matrices, differ by rank: each rank seeds its own RNG). Before wrapping: DDP would broadcast them itself,
    FSDP2 would keep each rank's shard of its own draw."""
    if not active():
        return
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


def gather_ints(value: int) -> list[int]:
    """Every rank's `value`, in rank order ([value] in one process)."""
    if not active():
        return [value]
    out: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is True on any (e.g. a stop signal one rank saw first)."""
    if not active():
        return flag
    x = torch.tensor([int(flag)], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())


def sum_over_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    if not active():
        return values
    x = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(x)
    return x.tolist()


def planned_world() -> int:
    """The number of processes of this job, known before the process group is joined (torchrun's WORLD_SIZE,
    or an initialised group's size; 1 in one process)."""
    if active():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


# the wrapping modes (imported last: they use `active` from here)
from gradus.parallel.modes import (  # noqa: E402
    MODES,
    Mode,
    clip_grad_norm,
    full_state_dict,
    full_tensors,
    gradient_sync,
    is_sharded,
    is_wrapped,
    mode_for,
    shard,
    unwrap_ddp,
    wrap,
)

__all__ = [
    "MODES",
    "CollectiveFailed",
    "Layout",
    "Mode",
    "active",
    "any_rank",
    "barrier",
    "broadcast_trainable",
    "clip_grad_norm",
    "collective_failure",
    "combine_over_ranks",
    "engine_started_group",
    "equal_pieces",
    "from_rank0",
    "full_state_dict",
    "full_tensors",
    "gather_ints",
    "global_max",
    "global_min",
    "gradient_sync",
    "is_sharded",
    "is_wrapped",
    "launched_by_torchrun",
    "mode_for",
    "planned_world",
    "rank_device",
    "setup",
    "shard",
    "sum_over_ranks",
    "teardown",
    "unwrap_ddp",
    "wrap",
]
