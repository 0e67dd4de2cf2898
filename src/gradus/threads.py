"""CPU threads that follow the machine's load.

Why: torch runs each CPU op as an OpenMP parallel region that ends in a barrier. The ops of a small
model take microseconds, so a step is thousands of regions. When another process keeps a core busy,
one of gradus' threads is descheduled for a time slice now and then, and every barrier waits for it:
measured here (2 cores, one busy process beside gradus) a DAPO step of the built-in model took 2.9x
its idle time with 2 threads and 1.0x with one (`bench/contention.py`). Waiting passively
(`OMP_WAIT_POLICY=PASSIVE`) cannot help: the barrier still waits for the descheduled thread.

What: before each unit of work (a training step, an evaluation, every fifth warm-start step) `pick()`
reads the kernel's accounting since the last pick: CPU seconds of gradus (its threads and its reward
worker processes) plus the seconds every core sat idle, per second of wall time. That
is how many cores gradus could have had; it uses that many threads (rounded down after adding 0.25,
at least 1, at most every core). An idle machine gives every core, as before; a busy process beside
it takes its core away at the next unit, and gives it back when it ends. Before the first unit, with
nothing of gradus running, it looks at the machine for 50 ms. Linux only (`/proc/stat`); elsewhere
torch's default is kept.

Thread count and results: on the built-in models the parameters after warm-start and RL steps are
bit-identical with 1 and 2 threads (tests/test_threads.py; on Intel CPUs only with MKL's strict
reproducibility mode, which `gradus/__init__.py` sets), so following the load changes speed, not results.
A fixed `run.threads` turns this off.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

_FIRST_LOOK_S = 0.05
_ROUND_UP_FROM = 0.75  # 1.75 cores free -> 2 threads; 1.5 (a busy process sharing our cores) -> 1
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# torch's thread count when gradus was imported (every core, or OMP_NUM_THREADS): the most a governor uses,
# whatever an earlier governor in this process left set
MACHINE_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds, monotonic
    own: float  # CPU seconds of this process
    idle: float  # idle CPU seconds summed over every core
    helpers: dict[int, float] = field(default_factory=dict)  # CPU seconds of each helper process, by pid


def ours_between(before: Sample, after: Sample) -> float:
    """CPU seconds of this process and its helpers from `before` to `after`. A helper is counted by its
    own increase (a new one from zero), so one that was replaced in between takes nothing away."""
    return (after.own - before.own) + sum(cpu - before.helpers.get(pid, 0.0) for pid, cpu in after.helpers.items())


def read_sample(helpers: Iterable[int] = ()) -> Sample | None:
    """The kernel's counters now, with the processes `helpers` (pids) as our own work; None where
    /proc is not there (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    idle = (int(fields[4]) + int(fields[5])) / _TICK  # idle + iowait, every core
    return Sample(time.monotonic(), time.process_time(), idle, _cpu_of(helpers))


def _cpu_of(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each live process of `pids` (one that has ended is left out)."""
    found = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        after_name = stat.rsplit(")", 1)[1].split()  # the name may hold spaces; the fields follow ')'
        found[pid] = (int(after_name[11]) + int(after_name[12])) / _TICK  # utime, stime (fields 14, 15)
    return found


def threads_for(cores_free: float, max_threads: int) -> int:
    """Threads for `cores_free` cores: round down, unless within 0.25 of the next whole core."""
    return max(1, min(max_threads, math.floor(cores_free + 1 - _ROUND_UP_FROM)))


class ThreadGovernor:
    """Chooses torch's CPU thread count for the next unit of work; `fixed` pins it instead."""

    def __init__(self, fixed: int | None = None, *, max_threads: int | None = None,
                 helpers: Callable[[], Iterable[int]] = tuple,
                 sample: Callable[[Iterable[int]], Sample | None] = read_sample):
        self.fixed = fixed
        self.max_threads = max(1, max_threads or MACHINE_THREADS)
        self.current = fixed or self.max_threads
        self.cores_free = float(self.max_threads)  # the last estimate (a metric)
        self._initial = MACHINE_THREADS
        self._sample = lambda: sample(helpers())
        self._last: Sample | None = None

    def pick(self) -> int:
        """Set and return the thread count for the next unit of work."""
        if self.fixed:
            torch.set_num_threads(self.fixed)
            return self.fixed
        now = self._sample()
        if now is None:
            self.current = self.max_threads
        else:
            if self._last is None:  # nothing of ours ran yet: look at the machine for a moment
                time.sleep(_FIRST_LOOK_S)
                self._last, now = now, self._sample()
            wall = max(now.wall - self._last.wall, 1e-6)
            self.cores_free = (ours_between(self._last, now) + (now.idle - self._last.idle)) / wall
            self.current = threads_for(self.cores_free, self.max_threads)
            self._last = now
        torch.set_num_threads(self.current)
        return self.current

    def restore(self) -> None:
        """Give torch back the machine's thread count (as it was when gradus was imported)."""
        torch.set_num_threads(self._initial)


def governor_for(threads: int | None, device: torch.device | str = "cpu",
                 helpers: Callable[[], Iterable[int]] = tuple) -> ThreadGovernor:
    """The run's governor: `threads` pins the count; None follows the load (CPU only: on a GPU the
    CPU threads matter little, so torch's default is kept there). `helpers`: the pids whose CPU time
    is gradus' own work (the reward workers)."""
    if threads is None and torch.device(device).type != "cpu":
        return ThreadGovernor(fixed=MACHINE_THREADS)
    return ThreadGovernor(fixed=threads, helpers=helpers)


__all__ = ["MACHINE_THREADS", "Sample", "ThreadGovernor", "governor_for", "ours_between", "read_sample", "threads_for"]
