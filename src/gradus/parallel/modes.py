"""The registry of `run.parallel` modes: how a model is held by the processes of one job.

| mode    | a process holds                  | gradients                         | runs                        |
| ------- | -------------------------------- | --------------------------------- | --------------------------- |
| `none`  | the whole model                  | its own                           | one process                 |
| `ddp`   | the whole model (a replica)      | all-reduced (summed) in backward  | torchrun; one process: none |
| `fsdp2` | a shard of each weight           | reduce-scattered (summed)         | torchrun; one process: none |

Each mode says what in a config it cannot run with (`check`), wraps a model (`wrap`), and reads a wrapped
model's full weights one tensor at a time (`full_tensors`: under FSDP2 a collective, every rank must
iterate). In one process every mode runs as `none`: the same config runs on a laptop and under torchrun.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from gradus.config import ConfigError

if TYPE_CHECKING:
    from gradus.config import TrainConfig


class Mode:
    """`none`: the bare model in one process."""

    name: ClassVar[str] = "none"
    shards: ClassVar[bool] = False  # a process holds only part of each weight

    @classmethod
    def check(cls, cfg: TrainConfig, world: int) -> str | None:
        """Why this mode cannot run `cfg` on `world` processes, or None."""
        if world > 1:
            return f"run.parallel=none runs one process, not {world}; under torchrun use run.parallel=ddp or fsdp2"
        return None

    def wrap(self, model: nn.Module, device: torch.device, *, trainable: bool = True) -> nn.Module:
        return model

    def bare(self, model: nn.Module) -> nn.Module:
        """The module inside the wrapper (the same parameters); a sharded model is its own module."""
        return unwrap_ddp(model)

    def full_tensors(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return full_tensors(model)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective (sharded modes): the whole weights on CPU on rank 0, {} on the others."""
        return full_state_dict(model)


class DDP(Mode):
    name = "ddp"

    @classmethod
    def check(cls, cfg: TrainConfig, world: int) -> str | None:
        return None

    def wrap(self, model: nn.Module, device: torch.device, *, trainable: bool = True) -> nn.Module:
        """A replica; a frozen model (the reference) stays bare: it needs no gradient sync."""
        if not trainable:
            return model
        # no collective in forward (ranks decode different numbers of steps): buffers are synced once, at init
        # (torch 2.13 renamed broadcast_buffers, which now warns, to forward_sync_buffers)
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp


class FSDP2(Mode):
    name = "fsdp2"
    shards = True

    @classmethod
    def check(cls, cfg: TrainConfig, world: int) -> str | None:
        return None

    def wrap(self, model: nn.Module, device: torch.device, *, trainable: bool = True) -> nn.Module:
        return shard(model)


MODES: dict[str, type[Mode]] = {m.name: m for m in (Mode, DDP, FSDP2)}


def mode_for(name: str, distributed: bool) -> Mode:
    """The mode a job runs: `name` under torchrun, `none` in one process."""
    if name not in MODES:
        raise ConfigError(f"run.parallel: unknown mode {name!r}; valid: {', '.join(MODES)}")
    return MODES[name]() if distributed else Mode()


def _sum_hook(_state, bucket):  # unannotated: DDP checks real annotations, this module has strings
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size, and gradus'
    losses are already divided by global counts)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block (the classes HF lists in `_no_split_modules`, found through a
    PEFT wrapper too) and the root. Frozen and trainable weights may share a block (LoRA's adapters beside
    the frozen base): FSDP2 keeps each parameter's requires_grad."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(f"run.parallel=fsdp2: {type(model).__name__} names no transformer block class "
                          "(_no_split_modules) to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: see gradus.parallel's docstring
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def wrap(model: nn.Module, kind: str, device: torch.device, *, trainable: bool = True) -> nn.Module:
    """The model as this job trains (or, trainable=False, evaluates) it under mode `kind` (`none` in one process)."""
    from gradus.parallel import active

    return mode_for(kind, active()).wrap(model, device, trainable=trainable)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the same parameters), or the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_wrapped(model: nn.Module) -> bool:
    """Whether the wrapper syncs gradients itself (DDP, FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, nn.parallel.DistributedDataParallel | FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (rather than whole tensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensors(model: nn.Module, *, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter of `model` (a DDP wrapper's inner names), one at a time: a sharded
    parameter is all-gathered when reached, so at most one full weight exists beyond the shards. A parameter
    shared by two modules (a head tied to the embedding) comes under both names, as in a state dict: an
    engine may hold them as two tensors (vLLM's CPU head is its own copy). Under FSDP2 a collective: every
    rank must consume the iterator to its end, in the same order."""
    for name, param in unwrap_ddp(model).named_parameters(remove_duplicate=False):
        if trainable_only and not param.requires_grad:
            continue
        value = param.detach()
        yield name, value.full_tensor() if hasattr(value, "full_tensor") else value


@contextlib.contextmanager
def gradient_sync(models: list[nn.Module], enabled: bool) -> Iterator[None]:
    """Within the block, backward passes accumulate locally (enabled=False) or synchronise (True)."""
    from torch.distributed.fsdp import FSDPModule

    with contextlib.ExitStack() as stack:
        for model in models:
            if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
                stack.enter_context(model.no_sync())
            elif isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(enabled)
                stack.callback(model.set_requires_gradient_sync, True)
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the gradients' global norm to max_norm; returns the norm before clipping (over all shards)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: a sharded model's unsharded weights, on CPU on rank 0 ({} on the others), keyed as the
    bare model's state_dict (for saving)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
