"""CPU threads that follow the machine's load.

Why: torch runs each CPU op as an OpenMP parallel region that ends in a barrier. The ops of a small
model take microseconds, so a step is thousands of regions. When another process keeps one of the
cores busy, one of gradus' threads is descheduled for a whole time slice at a time, and every barrier
waits for it: measured here (2 cores, one busy process), an elementwise op on 2^17 floats took 12 us
with 2 threads on an idle machine and 6-30 ms with 2 threads beside the busy process (18 us with one
thread), and a training step took ten times as long (`bench/contention.py`). Waiting passively
(`OMP_WAIT_POLICY=PASSIVE`) does not help: the barrier still waits for the descheduled thread.

What: before each unit of work (a training step, an evaluation, a few warm-start steps) `pick()` times
a few such regions at the candidate thread counts and keeps the largest count whose regions are not
much slower than one thread's (a parallel op that is slower than the same op on one thread means
threads are waiting for each other). On an idle machine that is every core, as before, at the cost
of about a millisecond per check; beside a busy process it is fewer threads, at once.

Thread count and results: on the built-in models the parameters after warm-start and RL steps are
bit-identical with 1 and 2 threads (tested in tests/test_threads.py), so following the load changes
speed, not results. A fixed `run.threads` turns this off.
"""

from __future__ import annotations

import time

import torch

_PROBE_ELEMENTS = 1 << 17  # above ATen's parallel grain (32768), so the op really runs on every thread
_PROBE_REPS = 16
_SLOWER = 2.0  # a parallel op this much slower than on one thread: threads are waiting for each other


class ThreadGovernor:
    """Chooses torch's CPU thread count for the next unit of work; `fixed` pins it instead."""

    def __init__(self, fixed: int | None = None, *, max_threads: int | None = None):
        self.fixed = fixed
        self.max_threads = max(1, max_threads or torch.get_num_threads())
        self.current = fixed or self.max_threads
        self.reduced = 0  # units run with fewer threads than max_threads (a metric)
        self._initial = torch.get_num_threads()
        self._a = self._b = self._out = None

    def pick(self) -> int:
        """Set and return the thread count for the next unit of work."""
        if self.fixed:
            torch.set_num_threads(self.fixed)
            return self.fixed
        n = self.max_threads
        if n > 1:
            serial = self._region_seconds(1)
            while n > 1 and self._region_seconds(n, limit=_SLOWER * serial * _PROBE_REPS) > _SLOWER * serial:
                n //= 2
        self.reduced += n < self.max_threads
        self.current = n
        torch.set_num_threads(n)
        return n

    def restore(self) -> None:
        """Give torch back the thread count it had when this governor was made."""
        torch.set_num_threads(self._initial)

    def _region_seconds(self, threads: int, limit: float | None = None) -> float:
        """Mean seconds of one elementwise op at `threads`; stops early once `limit` seconds are spent."""
        if self._a is None:
            self._a, self._b = torch.rand(_PROBE_ELEMENTS), torch.rand(_PROBE_ELEMENTS)  # [E]
            self._out = torch.empty(_PROBE_ELEMENTS)
        torch.set_num_threads(threads)
        torch.add(self._a, self._b, out=self._out)  # the team of `threads` exists before timing
        start = time.perf_counter()
        for rep in range(1, _PROBE_REPS + 1):
            torch.add(self._a, self._b, out=self._out)
            spent = time.perf_counter() - start
            if limit is not None and spent > limit:
                return spent / rep
        return (time.perf_counter() - start) / _PROBE_REPS


def governor_for(threads: int | None, device: torch.device | str = "cpu") -> ThreadGovernor:
    """The run's governor: `threads` pins the count; None follows the load (CPU only: on a GPU the
    CPU threads matter little, so torch's default is kept there)."""
    if threads is None and torch.device(device).type != "cpu":
        return ThreadGovernor(fixed=torch.get_num_threads())
    return ThreadGovernor(fixed=threads)


__all__ = ["ThreadGovernor", "governor_for"]
