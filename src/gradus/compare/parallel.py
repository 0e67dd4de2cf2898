"""`gradus compare --jobs N`: N runs at once, each in a process of its own.

A run's result does not depend on how many runs share the machine: each process is a whole `gradus train` run
(spawned, not forked, so no torch thread pool is copied mid-use), with its own seed, and a run's parameters
are bit-identical whatever CPU threads it gets (tests/test_threads.py). Its wall time does depend on it: the
report's times are then those of runs sharing the cores. With `run.threads` unset each run's thread governor
takes fewer threads while the other runs keep cores busy.

Signals: a worker leaves the terminal's process group, so Ctrl-C (or SIGTERM) reaches the parent alone, which
passes each signal on to every running run once and starts no new one. A run's first signal makes it finish
and save its step, the second abandons the step (gradus.train.interrupts): the same two presses as a single
run. Should the parent die (`kill -9`), each run gets one SIGTERM and saves its step. Each run's warm
start is made first, one at a time in this process, so that two runs of one seed never both build it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

from gradus.algorithm import resolve_algo
from gradus.compare.jobs import RunJob, RunStatus, start_message, train_one
from gradus.train.interrupts import StopSignals
from gradus.train.runlog import read_metrics

INTERRUPTED = 130  # a worker's exit code when its run stopped on a signal (the shell's code for SIGINT)
PROGRESS_EVERY_S = 60.0  # how often the steps of the runs in progress are printed


def run_parallel(todo: list[RunJob], out: Path, jobs: int, echo: Callable[[str], None]) -> list[RunStatus]:
    """Train `todo` with up to `jobs` worker processes; the statuses of the runs that ended, in the order they
    ended. Raises KeyboardInterrupt after every running run has stopped, when a signal asked to stop."""
    _make_warm_starts(todo)
    for job in todo:  # progress bars of several processes would overwrite each other: a line a minute instead
        job.cfg.run.progress = False
    context = multiprocessing.get_context("spawn")
    pending = deque(todo)
    running: dict[int, tuple[multiprocessing.process.BaseProcess, RunJob, float]] = {}
    statuses: list[RunStatus] = []
    last_progress = time.monotonic()
    with _Forwarder(running) as stop:
        while running or (pending and stop.signum is None):
            while pending and len(running) < jobs and stop.signum is None:
                job = pending.popleft()
                echo(start_message(job))
                proc = context.Process(target=_worker, args=(job, out), name=f"gradus-compare {job.name}")
                proc.start()
                running[proc.sentinel] = (proc, job, time.perf_counter())
            for sentinel in wait(list(running), timeout=PROGRESS_EVERY_S):
                proc, job, start = running.pop(sentinel)
                proc.join()
                statuses.append(_ended(job, proc.exitcode, time.perf_counter() - start, out, echo))
            if running and time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                echo(progress_line([job for _, job, _ in running.values()]))
    if stop.signum is not None:
        left = [s.name for s in statuses if s.state == "interrupted"] + [job.name for job in pending]
        echo(f"stopped on {signal.Signals(stop.signum).name}; not finished: {', '.join(left)}; continue with "
             f"`gradus compare --resume {out}`")
        raise KeyboardInterrupt
    return statuses


def _make_warm_starts(todo: list[RunJob]) -> None:
    """Build (or find in the cache) the model each run starts from, one after another, before any run starts."""
    from gradus.train.bootstrap import initial_model_dir

    for job in todo:
        if not job.resume and not job.cfg.model.path:
            initial_model_dir(job.cfg, progress=job.cfg.run.progress)


def _worker(job: RunJob, out: Path) -> None:
    """A worker process: one run. Exit 0 when it finished, 1 when it failed (metrics/<run>.error.txt says why),
    INTERRUPTED when a signal stopped it."""
    os.setpgrp()  # out of the terminal's process group: the parent alone decides which signals reach the run
    _stop_with_parent()
    try:
        status = train_one(job, out, lambda message: print(message, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    sys.exit(0 if status.state == "done" else 1)


def _stop_with_parent() -> None:
    """When the parent dies (`kill -9`, a crash), send this run one SIGTERM: it saves its step and stops, instead of
    training on unseen beside a `gradus compare --resume` that would start it again. A watcher thread on the
    parent's sentinel, not PR_SET_PDEATHSIG: the kernel sends that once per exiting thread of the parent, and a
    second signal makes the run abandon its step unsaved."""
    sentinel = multiprocessing.parent_process().sentinel

    def watch() -> None:
        wait([sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gradus-compare-parent", daemon=True).start()


def _ended(job: RunJob, code: int | None, seconds: float, out: Path, echo: Callable[[str], None]) -> RunStatus:
    error_file = out / "metrics" / f"{job.name}.error.txt"
    if code == 0:
        echo(f"{job.label}: done in {seconds:.0f} s")
        return RunStatus(job.name, job.algo, job.seed, "done", seconds)
    if code == INTERRUPTED:
        echo(f"{job.label}: interrupted after {seconds:.0f} s")
        return RunStatus(job.name, job.algo, job.seed, "interrupted", seconds)
    if code == 1 and error_file.is_file():  # the worker wrote the traceback and said FAILED itself
        last = error_file.read_text().strip().splitlines()[-1]
        return RunStatus(job.name, job.algo, job.seed, "failed", seconds, last)
    # killed from outside (e.g. the kernel's out-of-memory killer: -9) or died before it could say why
    why = f"its process ended with exit code {code}" + (" (killed by signal " + signal.Signals(-code).name + ")"
                                                        if code is not None and code < 0 else "")
    error_file.write_text(f"{job.name}: {why}; its newest checkpoint, if any, is kept: `gradus compare --resume "
                          f"{out}` continues it\n")
    echo(f"{job.label}: FAILED: {why}")
    return RunStatus(job.name, job.algo, job.seed, "failed", seconds, why)


def progress_line(jobs: list[RunJob]) -> str:
    """The runs in progress and how far each is: "in progress: ppo-seed0 step 251/1000, grpo-seed0 step ..."."""
    return "in progress: " + ", ".join(f"{job.name} step {_last_step(job.run_dir)}/{resolve_algo(job.cfg).steps}"
                                       for job in jobs)


def _last_step(run_dir: Path) -> int:
    """The newest step in a run's metrics.jsonl (0 before its first)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else 0


class _Forwarder(StopSignals):
    """While open, SIGINT and SIGTERM are recorded (`signum`) and passed on to every running worker, each time
    (the workers count them: the first saves, the second abandons); the previous handlers come back on exit."""

    def __init__(self, running: dict[int, tuple[multiprocessing.process.BaseProcess, RunJob, float]]) -> None:
        super().__init__()
        self.running = running

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signum = signum
        for proc, _, _ in list(self.running.values()):
            if proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:  # it ended meanwhile
                    pass
