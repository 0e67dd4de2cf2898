"""One run of a comparison: its name, what it needs to train (`RunJob`), how it ended (`RunStatus`), and training
it (`train_one`), in this process or in a `--jobs` worker process (gradus.compare.parallel)."""

from __future__ import annotations

import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradus.config import TrainConfig


def run_name(algo: str, seed: int) -> str:
    """The folder and file name of a run of an --algos entry (grpo:algo.routing_replay=r3 -> grpo+routing_replay=r3)."""
    parts = algo.split(":")
    label = "+".join([parts[0], *(p.split(".", 1)[-1] for p in parts[1:])])
    return f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', label)}-seed{seed}"


@dataclass
class RunStatus:
    name: str
    algo: str
    seed: int
    state: str  # done, failed, skipped (already done), interrupted
    seconds: float = 0.0
    error: str | None = None


@dataclass
class RunJob:
    """One run still to train: what `train_one` needs, in this process or in a `--jobs` worker process."""
    name: str
    algo: str
    seed: int
    label: str  # "[i/n] name": the progress bar's title and the prefix of every message about the run
    cfg: TrainConfig
    run_dir: Path
    resume: bool  # it has a checkpoint to continue from


def start_message(job: RunJob) -> str:
    from gradus.algorithm import resolve_algo

    return f"{job.label}: {'resuming' if job.resume else 'starting'} ({resolve_algo(job.cfg).steps} steps)"


def train_one(job: RunJob, out: Path, echo: Callable[[str], None]) -> RunStatus:
    """Train one run to its end and copy its metrics next to the report. A run that raises is recorded
    (metrics/<run>.error.txt) and reported as failed; KeyboardInterrupt (Ctrl-C, SIGTERM) goes through."""
    from gradus.train.trainer import Trainer

    (out / "metrics" / f"{job.name}.error.txt").unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        Trainer(job.cfg, run_dir=job.run_dir, resume=job.resume, label=job.label).fit()
    except Exception as err:  # a failing run is reported, the comparison goes on
        (out / "metrics" / f"{job.name}.error.txt").write_text(traceback.format_exc())
        echo(f"{job.label}: FAILED: {type(err).__name__}: {err}")
        return RunStatus(job.name, job.algo, job.seed, "failed", time.perf_counter() - start, f"{err}")
    _collect(job.run_dir, out / "metrics", job.name)
    return RunStatus(job.name, job.algo, job.seed, "done", time.perf_counter() - start)


def _collect(run_dir: Path, metrics_dir: Path, name: str) -> None:
    """Copy a finished run's raw metrics and summary next to the report (summary last: it marks done)."""
    shutil.copyfile(run_dir / "metrics.jsonl", metrics_dir / f"{name}.jsonl")
    shutil.copyfile(run_dir / "config.yaml", metrics_dir / f"{name}.config.yaml")
    tmp = metrics_dir / f"{name}.summary.json.tmp"
    shutil.copyfile(run_dir / "summary.json", tmp)
    tmp.replace(metrics_dir / f"{name}.summary.json")


def echo_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
