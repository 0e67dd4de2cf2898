"""The training state of a checkpoint through torch.distributed.checkpoint (DCP), for every run: one process,
DDP or FSDP2, any world size. The weights are saved beside it in plain HF format (`train.checkpoint`).

What goes through DCP (folder `dcp/` of a checkpoint):
- each trained model's optimizer state, keyed by parameter name (`get_optimizer_state_dict`): FSDP2 ranks
  write their shards, DDP replicas and a single process write one copy, and a load reshards to whatever
  layout the resuming job has, so a checkpoint resumes under any `run.parallel` and world size;
- `objects`: picklable values the trainer keeps (learning-rate schedulers, every rank's data position),
  written once (by rank 0) and read back by every rank;
- each rank's RNG state, as a file of its own (`rng-rank<r>.pt`: DCP keeps one copy of replicated values,
  and RNG states differ by rank). A job of another world size starts ranks without one from a seed.

Every rank writes into a staging folder next to the checkpoints, `.dcp-step-N`; rank 0 then moves it into
the checkpoint it is assembling, which becomes `step-N` only once complete (`train.checkpoint.save_checkpoint`).
All ranks must see the same file system (one node, or a shared one).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gradus.parallel import active, barrier

DCP_DIR = "dcp"
OBJECTS = "objects"  # the key of the trainer's picklable values in the DCP state

# name -> (model as trained, its optimizer)
Parts = dict[str, tuple[nn.Module, torch.optim.Optimizer]]


def _rank() -> int:
    return dist.get_rank() if active() else 0


def staging_dir(root: Path, step: int) -> Path:
    return Path(root) / f".dcp-step-{step:06d}"


def save_state(root: Path, step: int, parts: Parts, objects: dict[str, Any], rng: dict) -> Path:
    """Collective: write the optimizer states of `parts`, `objects` and this rank's RNG state into the staging
    folder of `step`; returns it."""
    staging = staging_dir(root, step)
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a run killed while saving this step
        staging.mkdir(parents=True)
    barrier()
    state: dict[str, Any] = {name: get_optimizer_state_dict(model, opt) for name, (model, opt) in parts.items()}
    blob = io.BytesIO()
    torch.save(objects, blob)
    state[OBJECTS] = blob  # one opaque value: DCP keeps a BytesIO as it is (a dict it would flatten into keys)
    with _one_process_is_meant():
        dcp.save(state, checkpoint_id=str(staging), no_dist=not active())  # one process: no group (or vLLM's own)
    torch.save(rng, staging / f"rng-rank{_rank()}.pt")
    barrier()  # every shard is on disk before rank 0 moves the folder
    return staging


def load_state(ckpt: Path, parts: Parts, *, objects: bool = True) -> tuple[dict[str, Any], dict | None]:
    """Collective: load the optimizer states saved by `save_state` into `parts` (built as the resuming job builds
    them, on any world size), and return the saved objects ({} with objects=False: a checkpoint written before
    they were kept here) and this rank's RNG state (None when the checkpoint was written by fewer ranks)."""
    folder = Path(ckpt) / DCP_DIR
    state: dict[str, Any] = {name: get_optimizer_state_dict(model, opt) for name, (model, opt) in parts.items()}
    if objects:
        state[OBJECTS] = io.BytesIO()
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=str(folder), no_dist=not active())
    for name, (model, opt) in parts.items():
        set_optimizer_state_dict(model, opt, state[name])
    saved = {}
    if objects:
        state[OBJECTS].seek(0)
        saved = torch.load(state[OBJECTS], weights_only=False)
    rng = folder / f"rng-rank{_rank()}.pt"
    return saved, torch.load(rng, weights_only=False) if rng.is_file() else None


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns on every save and load of one process that it assumes one process was meant: it was."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent is to (save|load) in a "
                                "single process", category=UserWarning)
        yield


def load_legacy_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                          names: list[str]) -> None:
    """An optimizer state saved by gradus before DCP checkpoints (`optimizer.state_dict()` of one process,
    keyed by the position of each trainable parameter) into `optimizer`, under any layout: the positions are
    renamed to the parameters' names (`names`, in the bare model's order) and loaded as a full state."""
    state = {names[int(i)]: value for i, value in saved["state"].items()}
    groups = [dict(g, params=[names[int(i)] for i in g["params"]]) for g in saved["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def save_hf_full(model: nn.Module, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """Rank 0: save a (possibly FSDP2-wrapped) model's gathered weights as the bare HF class would; a PEFT model
    saves its adapter from them."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # e.g. lm_head.weight -> embed_tokens.weight
    state_dict = {k: v for k, v in state_dict.items() if k not in tied}  # the bare model saves one copy
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    config = Path(folder) / "config.json"
    if not config.is_file():  # an adapter folder (adapter_config.json): no class name to fix
        return
    bare = next((c for c in type(model).__mro__ if not c.__name__.startswith("FSDP") and c is not type(model)),
                type(model)) if type(model).__name__.startswith("FSDP") else type(model)
    data = json.loads(config.read_text())
    data["architectures"] = [bare.__name__]  # save_pretrained wrote the wrapper's class name
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
