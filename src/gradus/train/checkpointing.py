"""A run's checkpoints, one path for every run (one process, DDP or FSDP2, any world size):

- the weights in plain HF format (`policy/`, `critic/`; a LoRA policy as its adapter), written by rank 0 from
  each trained model's `writer` (under FSDP2 gathered first);
- the optimizer states, the learning-rate schedulers, every rank's data position and RNG through DCP
  (`gradus.parallel.checkpoint`), which reshards to the layout of the job that resumes;
- the run's bookkeeping (step, wall time, the evaluation before training, the initial model) in `state.pt`;
all published atomically with a manifest (`gradus.train.checkpoint.save_checkpoint`).

Checkpoints written before this layout (optimizer states in `state.pt`, or in DCP without the schedulers) are
read too: their optimizer states are renamed by parameter and loaded as a full state into any layout.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gradus import parallel
from gradus.config import ConfigError
from gradus.parallel.checkpoint import DCP_DIR, load_legacy_optimizer, load_state, save_state, staging_dir
from gradus.runtime import TrainedModel, parameter_names
from gradus.train.checkpoint import (
    capture_rng,
    checkpoint_dir,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from gradus.train.checkpoint import load_state as load_run_state
from gradus.train.durable import DiskFull, is_disk_full
from gradus.train.resume import data_position

if TYPE_CHECKING:
    from gradus.algorithm import ResolvedAlgo
    from gradus.config import TrainConfig
    from gradus.runtime import PolicyRuntime
    from gradus.train.data import PromptSource
    from gradus.train.tally import Tally


class Checkpointed(Protocol):
    """What a checkpoint saves of a run, and restores into it (the trainer)."""

    cfg: TrainConfig
    algo: ResolvedAlgo
    rank: int
    world: int
    actor: PolicyRuntime
    critic: TrainedModel | None
    tokenizer: Any
    source: PromptSource
    step: int
    tally: Tally
    elapsed: float
    initial_dir: Path
    eval_before: dict[str, float] | None


FORMAT = 2  # state.pt's "format": optimizer states, schedulers and data positions in DCP (1: before)


class Checkpointer:
    """The run folder of a trainer and its checkpoints: the one resumed, saving a step, restoring."""

    def __init__(self, trainer: Checkpointed, run_dir: Path | None, resume: bool) -> None:
        self.trainer = trainer
        cfg = trainer.cfg
        # one folder for the job: rank 0's clock names it (ranks start seconds apart, machines' clocks differ)
        name = cfg.run.name or f"{trainer.algo.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(run_dir) if run_dir else parallel.from_rank0(Path(cfg.run.out_dir) / name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resumed = latest_checkpoint(self.run_dir) if resume else None
        if resume and self.resumed is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        self.state: dict[str, Any] = load_run_state(self.resumed) if self.resumed else {}
        # (step, folder) of this history's newest save
        self._saved = (self.state["step"], self.resumed) if self.resumed else None

    def _parts(self) -> dict[str, TrainedModel]:
        t = self.trainer
        return {"actor": t.actor, **({"critic": t.critic} if t.critic is not None else {})}

    def restore(self) -> None:
        """Collective: the optimizer states, schedulers, data position and RNG of the checkpoint resumed (its
        weights were loaded with the models); nothing for a fresh run."""
        ckpt, state, t = self.resumed, self.state, self.trainer
        if ckpt is None:
            return
        parts = self._parts()
        rng = None
        if state.get("format", 1) >= FORMAT:
            optimizers = {name: part.optimizer_part() for name, part in parts.items()
                          if name in state["optimizers"]}  # the others had not stepped yet: nothing to load
            objects, rng = load_state(ckpt, optimizers)
            schedulers, positions = objects["schedulers"], objects["data_positions"]
        else:  # written before every checkpoint went through DCP
            if (ckpt / DCP_DIR).is_dir():  # a data-parallel run's: optimizer states by name already
                _, rng = load_state(ckpt, {name: part.optimizer_part() for name, part in parts.items()}, objects=False)
            else:
                for name, part in parts.items():
                    load_legacy_optimizer(part.model, part.optimizer, state[f"{name}_optimizer"],
                                          parameter_names(part))
            schedulers = {name: state[f"{name}_scheduler"] for name in parts}
            positions = state.get("data_positions") or [state.get("data_position", 0)]
        for name, part in parts.items():
            part.scheduler.load_state_dict(schedulers[name])
        t.source.position = data_position(positions, t.rank, t.world)
        restore_rng(rng if rng is not None else state["rng"])

    def save(self) -> Path | None:
        """Checkpoint the current step. A step this run already saved, or resumed from, is not written again: a
        step's state is fully determined, and rewriting it would only risk the copy. Every rank takes part
        (optimizer shards, gathered weights); rank 0 writes the checkpoint and gets its folder, the others None."""
        t = self.trainer
        if self._saved is not None and self._saved[0] == t.step:
            return self._saved[1]
        parts = self._parts()
        objects = {"schedulers": {name: part.scheduler.state_dict() for name, part in parts.items()},
                   "data_positions": parallel.gather_ints(t.source.position)}  # every rank's: DAPO's rounds differ
        # An optimizer that has not stepped yet (a save before step 1, the actor during a critic warm-up) has no
        # state, and asking DCP for it would make one: a step at lr 0 that counts in Adam's bias correction.
        stepped = {name: part.optimizer_part() for name, part in parts.items() if part.optimizer.state}
        root = checkpoint_dir(self.run_dir)
        try:
            staging = save_state(root, t.step, stepped, objects, capture_rng())
        except (OSError, RuntimeError) as err:
            full = is_disk_full(err, root)  # before the partial folder is removed and its space freed
            shutil.rmtree(staging_dir(root, t.step), ignore_errors=True)
            if full:
                raise DiskFull(f"checkpoint step-{t.step:06d}", root) from err
            raise
        writers = {DCP_DIR: functools.partial(os.replace, staging)}
        for name, part, tokenizer in (("policy", t.actor, t.tokenizer), ("critic", t.critic, None)):
            if part is not None and (write := part.writer(tokenizer)) is not None:
                writers[name] = write
        state = {"format": FORMAT, "optimizers": sorted(stepped), "tally": t.tally.state(), "elapsed": t.elapsed,
                 "initial_model_dir": str(t.initial_dir), "eval_before": t.eval_before}
        path = None
        if t.rank == 0:
            path = save_checkpoint(self.run_dir, t.step, state=state, keep=t.cfg.run.keep_checkpoints,
                                   writers=writers)
        parallel.barrier()
        self._saved = (t.step, path)
        return path
