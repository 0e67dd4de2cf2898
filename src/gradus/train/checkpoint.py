"""Atomic checkpoints: a folder per step, filled by writers (the models in HF format, safetensors; a LoRA policy
as its PEFT adapter folder, whose `adapter_config.json` names the base model; the DCP folder of the optimizer
states, schedulers, data positions and RNG, see `gradus.train.checkpointing`) and `state.pt`.

What a kill at any moment (or a full disk) can leave, and why it is safe:
1. A checkpoint is written into `.tmp-step-N-<pid>/`; every file and folder in it is fsync'ed, then
   a `COMPLETE` manifest (each file's size) is written and fsync'ed, then the folder is renamed to
   `step-N` (atomic on POSIX) and the parent folder fsync'ed. A `step-*` folder is never half written.
2. Nothing is deleted in place: a checkpoint being replaced or pruned is first renamed to
   `.trash-*`, and pruning runs only once the new checkpoint is complete. A half-deleted folder
   never carries a `step-*` name. `.tmp-*` and `.trash-*` leftovers go at the next save.
3. `latest_checkpoint` checks each candidate against its manifest and falls back to the newest one
   that is really complete, saying which it skipped (folders written by older versions, whose
   marker holds only the step, are checked for `state.pt` and the policy's weights).
4. A full disk raises `DiskFull` naming the folder; the half-written folder is removed and the
   checkpoints before it are untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradus.train.durable import DiskFull, fsync_dir, fsync_tree, is_disk_full, write_text_synced

MARKER = "COMPLETE"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path, step: int, *, state: dict[str, Any], writers: dict[str, Callable[[Path], None]], keep: int = 2,
) -> Path:
    """Write checkpoint `step-<step>`: `writers` maps a name to a function that fills `<checkpoint>/<name>` (a
    model in HF format, the DCP state's folder moved in), then `state.pt`, then the manifest; then keep only
    the newest `keep` (at least this one; any newer than it belong to an abandoned history)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".trash-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        for name, write in writers.items():
            write(tmp / name)
        torch.save({**state, "step": step, "rng": capture_rng()}, tmp / "state.pt")
        files = fsync_tree(tmp)
        write_text_synced(tmp / MARKER, json.dumps({"step": step, "files": files}))
        fsync_dir(tmp)
    except (OSError, RuntimeError) as err:
        full = is_disk_full(err, root)  # before the partial folder is removed and its space freed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(f"checkpoint {final.name}", root) from err
        raise
    if final.exists():  # a re-save: the old copy leaves only now that its replacement is complete
        _discard(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _prune(root, keep, final)
    return final


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why folder `ckpt` is not a complete checkpoint, or None when it is."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MARKER).read_text())
    except FileNotFoundError:
        return f"no {MARKER} marker"
    except (OSError, ValueError) as err:
        return f"unreadable {MARKER} marker ({err})"
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        expected = manifest["files"]
    else:  # written by an older gradus: the marker holds only the step
        weights = list((ckpt / "policy").glob("*.safetensors")) + list((ckpt / "policy").glob("*.bin"))
        if not weights:
            return "no weights in policy/"
        expected = {"state.pt": None, "policy/config.json": None}
    if "state.pt" not in expected:
        return "the manifest lists no state.pt"
    for rel, size in expected.items():
        try:  # one stat: a checkpoint pruned by a running trainer may vanish between two
            found = (ckpt / rel).stat()
        except (FileNotFoundError, NotADirectoryError):
            return f"{rel} is missing"
        if not stat.S_ISREG(found.st_mode):
            return f"{rel} is missing"
        if size is not None and found.st_size != size:
            return f"{rel} has {found.st_size} bytes, the manifest says {size}"
    return None


def latest_checkpoint(run_dir: Path, echo: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint of a run, or None. Incomplete ones are skipped and reported to
    `echo` (default: standard error)."""
    say = echo or _stderr
    for _, path in reversed(_step_folders(checkpoint_dir(run_dir))):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        say(f"gradus: skipping checkpoint {path}: {problem}")
    return None


def load_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state saved with a checkpoint (weights_only=False: it holds RNG state objects)."""
    return torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)


def capture_rng() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder, oldest first (by number: names may outgrow the padding)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return sorted(found)


def _prune(root: Path, keep: int, current: Path) -> None:
    """Keep `current` and the newest keep-1 complete checkpoints before it; discard the rest (older
    ones, incomplete ones, and any newer than `current`: a history this run has left)."""
    step = int(current.name.removeprefix("step-"))
    kept = 1
    for n, path in reversed(_step_folders(root)):
        if path == current:
            continue
        if n < step and kept < keep and checkpoint_problem(path) is None:
            kept += 1
            continue
        _discard(path)


def _discard(path: Path) -> None:
    """Rename out of the `step-*` namespace first, then delete: a kill mid-delete leaves only trash."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
