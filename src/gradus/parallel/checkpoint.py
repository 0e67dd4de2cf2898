"""Checkpoints of a data-parallel run: optimizer states through torch.distributed.checkpoint (DCP), the
weights in plain HF format (see `train.checkpoint`), and each rank's RNG state in a file of its own.

Every rank writes its shard of the optimizer states (FSDP2 shards them; under DDP they are replicas and
DCP writes one copy) into a staging folder next to the checkpoints, `.dcp-step-N`; rank 0 then moves it
into the checkpoint it is assembling, which becomes `step-N` only once complete (see
`train.checkpoint.save_checkpoint`). All ranks must see the same file system (one node, or a shared one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from gradus.parallel import barrier

DCP_DIR = "dcp"


def staging_dir(root: Path, step: int) -> Path:
    return Path(root) / f".dcp-step-{step:06d}"


def save_sharded(root: Path, step: int, parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
                 rng: dict) -> Path:
    """Collective: write every rank's optimizer shards and RNG state into the staging folder of `step`."""
    staging = staging_dir(root, step)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run killed while saving this step
        staging.mkdir(parents=True)
    barrier()
    state = {name: get_optimizer_state_dict(model, opt) for name, (model, opt) in parts.items()}
    dcp.save(state, checkpoint_id=str(staging))
    torch.save(rng, staging / f"rng-rank{dist.get_rank()}.pt")
    barrier()  # every shard is on disk before rank 0 moves the folder
    return staging


def load_sharded(ckpt: Path, parts: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> dict | None:
    """Collective: load the optimizer states saved by `save_sharded` into `parts` (built the same way, on any
    world size, a single process too), and return this rank's RNG state (None when the checkpoint was
    written with fewer ranks)."""
    folder = Path(ckpt) / DCP_DIR
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {name: get_optimizer_state_dict(model, opt) for name, (model, opt) in parts.items()}
    dcp.load(state, checkpoint_id=str(folder))
    for name, (model, opt) in parts.items():
        set_optimizer_state_dict(model, opt, state[name])
    rng = folder / f"rng-rank{rank}.pt"
    return torch.load(rng, weights_only=False) if rng.is_file() else None


def save_hf_full(model: nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """Rank 0: save a (possibly FSDP2-wrapped) model's gathered weights as the bare HF class would."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # e.g. lm_head.weight -> embed_tokens.weight
    state_dict = {k: v for k, v in state_dict.items() if k not in tied}  # the bare model saves one copy
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    bare = next((c for c in type(model).__mro__ if not c.__name__.startswith("FSDP") and c is not type(model)),
                type(model)) if type(model).__name__.startswith("FSDP") else type(model)
    config = Path(folder) / "config.json"
    data = json.loads(config.read_text())
    data["architectures"] = [bare.__name__]  # save_pretrained wrote the wrapper's class name
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
