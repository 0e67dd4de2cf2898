"""Wall-clock time limits that actually stop runaway pure-Python reward code.

Mechanism (main thread): ``signal.setitimer(ITIMER_REAL, s)`` delivers SIGALRM after ``s`` seconds and our
handler raises :class:`RewardTimeout` inside whatever Python frame is running, so an infinite ``while``
loop or a ``time.sleep`` is interrupted. Cost: a few ``setitimer``/``signal.signal`` calls per limited
call (microseconds; measured in ``tests/test_rewards.py::test_time_limit_overhead_small``).
Limits nest: active limits form a stack, the timer is armed for the earliest deadline, the handler raises
for the outermost limit that expired (``RewardTimeout.limit``), and leaving a limit re-arms the timer for
the ones still active, so an inner limit neither cancels nor swallows an outer one. ``math_verify`` arms
``signal.alarm`` itself, which shares the ITIMER_REAL timer; gradus therefore calls it with its own
timeouts disabled and wraps it in :func:`time_limit` instead.

Limits of the mechanism: a signal is only handled between Python bytecodes, so one long C call (a huge
``int`` power, a regex with catastrophic backtracking) finishes before the exception is raised.

Fallback (not the main thread, where signals cannot be installed): :func:`call_with_time_limit` runs the
function in a daemon worker thread and waits ``seconds``; on expiry it injects :class:`RewardTimeout` into
the worker with ``PyThreadState_SetAsyncExc`` (which also stops pure-Python loops at the next bytecode)
and returns to the caller at once. A worker stuck in C keeps running in the background until that call
returns, but the caller is not held up.
"""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class RewardTimeout(Exception):
    """Raised inside a reward call that ran past its time limit; ``limit`` is the limit that expired."""

    def __init__(self, message: str, limit: Limit | None = None) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(eq=False)
class Limit:
    """One active ``time_limit``: its absolute deadline on the ``time.monotonic`` clock."""

    seconds: float
    deadline: float


# Active limits of the main thread, outermost first. One SIGALRM handler serves them all: it raises for
# the OUTERMOST expired limit, so a catcher of an inner limit (which checks ``exc.limit``) never swallows
# the timeout of an outer one.
_active: list[Limit] = []
_saved_handler: Any = None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _arm() -> None:
    """Arm ITIMER_REAL for the earliest active deadline (or stop it when none is active)."""
    if _active:
        left = min(lim.deadline for lim in _active) - time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6))
    else:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _on_alarm(signum: int, frame: Any) -> None:
    now = time.monotonic()
    for lim in _active:
        if lim.deadline <= now:
            raise RewardTimeout(f"ran past its time limit of {lim.seconds:g} s", lim)
    _arm()  # the timer rang a little early: wait for the real deadline


@contextmanager
def time_limit(seconds: float | None) -> Iterator[Limit | None]:
    """Raise RewardTimeout in this (main) thread if the block runs longer than ``seconds``.

    Yields the :class:`Limit` (None when there is no limit) so a catcher can tell its own timeout
    (``exc.limit is lim``) from an enclosing one, which it must re-raise. ``None`` or a non-positive value
    means no limit. Outside the main thread this raises RuntimeError: use :func:`call_with_time_limit`.
    """
    global _saved_handler
    if seconds is None or seconds <= 0:
        yield None
        return
    if not _in_main_thread():
        raise RuntimeError("time_limit needs the main thread; use call_with_time_limit")
    lim = Limit(seconds, time.monotonic() + seconds)
    if not _active:
        _saved_handler = signal.signal(signal.SIGALRM, _on_alarm)
    _active.append(lim)
    _arm()
    try:
        yield lim
    finally:
        _leave(lim)


def _leave(lim: Limit) -> None:
    """Remove ``lim`` and re-arm for the enclosing limits, even if the alarm rings during this cleanup.

    The alarm can ring between the end of the block and here, or in here; the handler would then raise in
    the middle of the cleanup. Retrying until the bookkeeping is done guarantees a consistent state. A
    timeout swallowed this way is never lost: it is either ``lim``'s own (the block had finished), or an
    enclosing limit's, whose deadline is then already past, so re-arming makes it ring again at once.
    """
    global _saved_handler
    while True:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if lim in _active:
                _active.remove(lim)
            if not _active:
                signal.signal(
                    signal.SIGALRM, _saved_handler if _saved_handler is not None else signal.SIG_DFL
                )
                _saved_handler = None
            break
        except RewardTimeout:
            continue
    if _active:
        _arm()


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Ask the interpreter to raise ``exc_type`` in ``thread`` at its next bytecode."""
    ident = thread.ident
    if ident is None:
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))


def call_with_time_limit(fn: Callable[..., T], seconds: float | None, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` under a wall-clock limit; RewardTimeout if it runs past it."""
    if seconds is None or seconds <= 0:
        return fn(*args, **kwargs)
    if _in_main_thread():
        with time_limit(seconds):
            return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def _work() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    worker = threading.Thread(target=_work, name="gradus-reward", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        _raise_in_thread(worker, RewardTimeout)
        raise RewardTimeout(f"ran past its time limit of {seconds:g} s (worker thread)")
    if "error" in box:
        raise box["error"]
    return box["value"]
