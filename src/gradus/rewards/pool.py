"""Reward calls in worker processes, under time limits that hold whatever the reward does.

A reward is user code (or math_verify/sympy on model output): it can loop while catching ``Exception``,
hold the GIL in one C call for hours (``9^{9^{9^9}}``, ``100000000!``), raise ``SystemExit`` or call
``os._exit``. Signals and threads cannot stop all of that; killing a process can. So every reward call runs
in a :mod:`gradus.rewards.worker` process, and a call past its limit has its worker killed (SIGTERM, then
SIGKILL) and replaced.

How a batch of n completions is scored for reward k (:meth:`RewardPool.score`):
1. the batch is cut into one contiguous chunk per worker, and each chunk is one request (one IPC round
   trip per worker and call, not per completion), limited to ``timeout_s`` from when its worker gets it;
2. a chunk that fails (times out, raises, returns bad scores, or kills its worker) is split into its
   completions, each retried alone under its own ``timeout_s`` on whichever worker is free; only the
   completions that fail alone are failures (:class:`Failure`), so one hostile completion costs its
   chunk's retry, never its neighbours' scores.
The worst case is ``timeout_s`` for the chunks plus ``timeout_s`` per round of culprits (as many run at
once as there are workers), plus restarts: a new worker imports its rewards again (about 0.4 s, 2 s with
math_verify, on a busy 2-core machine). The cost of a call with no failure is the pickling and one round
trip per worker: about 1 ms for 512 completions (``bench/reward_overhead.py``).
With ``strict=True`` the first failure raises instead (RewardTimeout or RewardError) and the workers busy
at that moment are killed.

Workers are fresh interpreters started with ``subprocess`` (neither ``fork``, unsafe with the parent's
torch threads, nor ``multiprocessing`` spawn, which re-runs the user's ``__main__`` script). They import
``module:function`` rewards with the parent's ``sys.path``; a reward that cannot be built is a ValueError
from the constructor, before any training. They die with the parent (see the worker's docstring), and
:meth:`RewardPool.close` (also run at garbage collection and at interpreter exit) stops them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 120.0  # a worker that imports its rewards slower than this is broken
_KILL_GRACE_S = 0.2  # after SIGTERM, before SIGKILL
_CLOSE_GRACE_S = 2.0  # for idle workers to exit on their own at close
_SRC = str(Path(__file__).resolve().parents[2])  # the folder that holds the gradus package
log = logging.getLogger("gradus.rewards")


class RewardTimeout(Exception):
    """A reward ran past its time limit (raised only with ``strict=True``)."""


class RewardError(RuntimeError):
    """A reward raised, returned bad scores, or ended its worker (raised only with ``strict=True``)."""


@dataclass(frozen=True)
class Failure:
    """Why one completion got no score: ``kind`` is "error" or "timeout"; ``detail`` a traceback or message."""

    kind: str
    detail: str


@dataclass(frozen=True)
class _Job:
    items: list[int]  # indices into the batch
    alone: bool  # one completion on its own: its failure is final


def default_workers() -> int:
    """Two to four workers: two so that a killed chunk never stalls the whole batch, at most half the cores."""
    return min(4, max(2, (os.cpu_count() or 2) // 2))


class _Worker:
    """One worker process, its connection, and what it is doing: starting, idle or busy with ``job``."""

    def __init__(self, init: dict[str, Any]) -> None:
        conn, child = Pipe()
        code = (f"import sys; sys.path.insert(0, {_SRC!r}); "
                f"from gradus.rewards.worker import main; main({child.fileno()})")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, pass_fds=[child.fileno()]
        )
        child.close()
        self.conn = conn
        self.job: _Job | None = None
        self.ready = False
        self.deadline: float | None = time.monotonic() + START_TIMEOUT_S
        main_thread = threading.current_thread() is threading.main_thread()
        try:
            conn.send(dict(init, parent_pid=os.getpid(), die_with_parent=main_thread))
        except OSError:
            pass  # it died at once: its connection reads as closed, and the caller sees that

    def receive(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            try:
                code = self.proc.wait(1.0)
            except subprocess.TimeoutExpired:  # it closed the connection but lives on: end it
                self.stop()
                code = self.proc.returncode
            return "died", code

    def stop(self, exit_grace: float = 0.0) -> None:
        """Close the connection and the lifeline; after ``exit_grace`` s for a clean exit, SIGTERM, then SIGKILL."""
        self.conn.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        for end in (self.proc.terminate, self.proc.kill):
            try:
                self.proc.wait(exit_grace)
                return
            except subprocess.TimeoutExpired:
                end()
                exit_grace = _KILL_GRACE_S
        self.proc.wait()


def _stop_all(workers: list[_Worker], owner: int) -> None:
    if os.getpid() != owner:  # a forked copy of the pool's process: the workers are not its to stop
        return
    for w in workers:  # every lifeline first, so the idle workers exit together
        w.conn.close()
        if w.proc.stdin is not None:
            w.proc.stdin.close()
    end = time.monotonic() + _CLOSE_GRACE_S
    for w in workers:
        w.stop(max(end - time.monotonic(), 0.0))
    workers.clear()


class RewardPool:
    """Worker processes that score batches with the rewards ``specs`` (``(name_or_path, options)`` pairs)."""

    def __init__(
        self,
        specs: Sequence[tuple[str, dict[str, Any]]],
        labels: Sequence[str],
        *,
        timeout_s: float | None,
        workers: int | None = None,
        build: str = "gradus.rewards:get_reward",
        check: str = "gradus.rewards.worker:check_scores",
        what: str = "reward",
    ) -> None:
        """``build``/``check`` ("module:function"): how a worker makes each spec's function and checks its answers
        (an environment pool passes its own); ``what`` names the functions in messages."""
        self.labels = list(labels)
        self.what = what
        self.timeout_s = timeout_s if timeout_s is not None and timeout_s > 0 else None
        self.size = workers or default_workers()
        self._init = {"sys_path": list(sys.path), "specs": [(name, dict(opts)) for name, opts in specs],
                      "build": build, "check": check}
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one call at a time: the workers serve one request each
        self._slow_chunks: set[int] = set()  # rewards whose chunk timed out (told once)
        self._finalizer = weakref.finalize(self, _stop_all, self._workers, os.getpid())
        try:
            self._start_missing()
            self._wait_ready(config_error=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every worker (a later :meth:`score` starts new ones)."""
        _stop_all(self._workers, os.getpid())

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pids(self) -> list[int]:
        """Process ids of the current workers (for tests and diagnostics)."""
        return [w.proc.pid for w in self._workers]

    # ---- scoring ---------------------------------------------------------------------------------
    def score(
        self,
        k: int,
        prompts: Sequence[str],
        completions: Sequence[str],
        fields: dict[str, Sequence[Any]],
        *,
        strict: bool = False,
    ) -> list[float | Failure]:
        """Reward ``k``'s score, or its :class:`Failure`, for every completion (algorithm: module docstring)."""
        with self._lock:
            return self._score(k, prompts, completions, fields, strict)

    def _score(self, k: int, prompts: Sequence[str], completions: Sequence[str], fields: dict[str, Sequence[Any]],
               strict: bool) -> list[float | Failure]:
        n = len(completions)
        out: list[float | Failure | None] = [None] * n
        if n == 0:
            return []
        self._start_missing()
        parts = min(self.size, n)
        cuts = [n * i // parts for i in range(parts + 1)]
        queue = deque(_Job(list(range(a, b)), alone=b - a == 1) for a, b in zip(cuts, cuts[1:], strict=False))
        try:
            while queue or any(w.job is not None for w in self._workers):
                for w in list(self._workers):
                    if w.ready and w.job is None and queue:
                        if w.proc.poll() is not None:  # died while idle (killed from outside): not this job's fault
                            self._replace(w)
                            continue
                        self._send(w, queue.popleft(), k, prompts, completions, fields)
                for w, reply in self._next_events():
                    job = w.job
                    if job is None:  # a replacement worker became ready
                        continue
                    w.job, w.deadline = None, None
                    if reply[0] == "ok":
                        for i, v in zip(job.items, reply[1], strict=True):
                            out[i] = v
                        continue
                    failure = self._failure(w, reply)
                    if strict:
                        raise (RewardTimeout if failure.kind == "timeout" else RewardError)(
                            f"{self.what} {self.labels[k]!r}: {failure.detail}"
                        )
                    if job.alone:
                        out[job.items[0]] = failure
                    else:
                        if failure.kind == "timeout" and k not in self._slow_chunks:
                            self._slow_chunks.add(k)
                            log.warning("%s %r: a chunk of %d calls ran past the time limit of %g s; retrying "
                                        "them one by one (if the %s is only slow, raise the limit)",
                                        self.what, self.labels[k], len(job.items), self.timeout_s, self.what)
                        queue.extend(_Job([i], alone=True) for i in job.items)
        except BaseException:  # strict, Ctrl-C...: the busy workers' answers would be for a call nobody awaits
            for w in self._workers:
                if w.job is not None:
                    w.stop()
            self._workers[:] = [w for w in self._workers if w.job is None]  # the next call starts new ones
            raise
        return out  # type: ignore[return-value]  # every entry is set once the queue is empty

    def _send(self, w: _Worker, job: _Job, k: int, prompts: Sequence[str], completions: Sequence[str],
              fields: dict[str, Sequence[Any]]) -> None:
        w.job = job
        request = (k, [prompts[i] for i in job.items], [completions[i] for i in job.items],
                   {key: [col[i] for i in job.items] for key, col in fields.items()})
        try:
            w.conn.send(request)
        except OSError:
            pass  # the worker is gone: its connection reads as closed, reported as "died"
        w.deadline = time.monotonic() + self.timeout_s if self.timeout_s is not None else None

    def _next_events(self) -> list[tuple[_Worker, tuple[str, Any]]]:
        """Wait for the next replies, deaths or expired deadlines of busy or starting workers."""
        waiting = [w for w in self._workers if w.job is not None or not w.ready]
        deadlines = [w.deadline for w in waiting if w.deadline is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        readable = wait([w.conn for w in waiting], timeout)
        now = time.monotonic()
        events = []
        for w in waiting:
            if w.conn in readable:
                reply = w.receive()
            elif w.deadline is not None and now >= w.deadline:
                reply = ("timeout", None)
            else:
                continue
            if not w.ready:
                self._on_start(w, reply)
            events.append((w, reply))
        return events

    def _failure(self, w: _Worker, reply: tuple[str, Any]) -> Failure:
        """The failure a reply stands for; a worker that timed out or died is replaced."""
        kind, detail = reply
        if kind == "error":
            return Failure("error", detail)
        self._replace(w)
        if kind == "timeout":
            return Failure("timeout", f"ran past its time limit of {self.timeout_s:g} s; its worker was killed")
        return Failure(
            "error",
            f"its worker process ended (exit code {detail}) while scoring: os._exit, a crash or the OOM killer",
        )

    # ---- workers ---------------------------------------------------------------------------------
    def _start_missing(self) -> None:
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self._init))

    def _replace(self, w: _Worker) -> None:
        w.stop()
        self._workers[self._workers.index(w)] = _Worker(self._init)

    def _on_start(self, w: _Worker, reply: tuple[str, Any], config_error: bool = False) -> None:
        kind, detail = reply
        if kind == "ready":
            w.ready, w.deadline = True, None
            return
        if kind == "init_error":
            message = detail
        elif kind == "timeout":
            message = f"a {self.what} worker did not start within {START_TIMEOUT_S:g} s"
        else:
            message = f"a {self.what} worker ended while starting (exit code {detail})"
        raise (ValueError if config_error else RuntimeError)(message)

    def _wait_ready(self, config_error: bool) -> None:
        while not all(w.ready for w in self._workers):
            starting = [w for w in self._workers if not w.ready]
            timeout = max(0.0, min(w.deadline or 0.0 for w in starting) - time.monotonic())
            readable = wait([w.conn for w in starting], timeout)
            now = time.monotonic()
            for w in starting:
                if w.conn in readable:
                    self._on_start(w, w.receive(), config_error)
                elif w.deadline is not None and now >= w.deadline:
                    self._on_start(w, ("timeout", None), config_error)
