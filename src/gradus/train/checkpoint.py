"""Atomic checkpoints: models in HF format (safetensors), plus optimizer, scheduler, RNG and data
position in `state.pt`.

A checkpoint is written into a temporary folder and renamed into place only when complete (a
rename is atomic on POSIX), with a `COMPLETE` marker written last inside it. A crash mid-write
leaves a `.tmp-*` folder that is never mistaken for a checkpoint and is removed on the next save.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "COMPLETE"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path, step: int, *, models: dict[str, tuple[Any, Any]], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint `step-<step>` with each model (and tokenizer, if given) in HF format."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    for name, (model, tokenizer) in models.items():
        model.save_pretrained(tmp / name, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / name)
    torch.save({**state, "step": step, "rng": capture_rng()}, tmp / "state.pt")
    (tmp / MARKER).write_text(str(step))
    final = root / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob("step-*") if (p / MARKER).is_file()) if root.is_dir() else []
    return done[-1] if done else None


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


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
