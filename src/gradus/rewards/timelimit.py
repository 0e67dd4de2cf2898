"""Wall-clock time limits that actually stop runaway pure-Python reward code.

Mechanism (main thread): ``signal.setitimer(ITIMER_REAL, s)`` delivers SIGALRM after ``s`` seconds and our
handler raises :class:`RewardTimeout` inside whatever Python frame is running, so an infinite ``while``
loop or a ``time.sleep`` is interrupted. Cost: two ``setitimer`` system calls and two ``signal.signal``
calls per limited call (microseconds; measured in ``tests/test_rewards.py::test_time_limit_overhead_small``).
Limits nest: entering saves the timer already armed (e.g. by an outer limit), arms the earlier of the two
deadlines, and on exit re-arms the outer timer with what is left of it, so an inner limit never cancels
an outer one. ``math_verify`` arms ``signal.alarm`` itself, which shares the ITIMER_REAL timer; gradus
therefore calls it with its own timeouts disabled and wraps it in :func:`time_limit` instead.

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
from typing import Any, TypeVar

T = TypeVar("T")


class RewardTimeout(Exception):
    """Raised inside a reward call that ran past its time limit."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise RewardTimeout in this (main) thread if the block runs longer than ``seconds``.

    ``None`` or a non-positive value means no limit. Outside the main thread this raises RuntimeError:
    use :func:`call_with_time_limit`, which has a thread fallback.
    """
    if seconds is None or seconds <= 0:
        yield
        return
    if not _in_main_thread():
        raise RuntimeError("time_limit needs the main thread; use call_with_time_limit")

    def _on_alarm(signum: int, frame: Any) -> None:
        raise RewardTimeout(f"ran past its time limit of {seconds:g} s")

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    # setitimer returns the timer that was armed before (0.0 if none): an outer limit to restore later.
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if 0 < old_delay < seconds:
        # The outer deadline comes first; keep it (our handler fires then, and the outer catch sees it).
        signal.setitimer(signal.ITIMER_REAL, old_delay)
    try:
        yield
    finally:
        _disarm()
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = old_delay - (time.monotonic() - start)
            # An outer deadline that passed while we ran must still fire, so re-arm it almost at once.
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), old_interval)


def _disarm() -> None:
    """Stop the timer and ignore a SIGALRM still pending, even if it trips while we clean up.

    The alarm can fire between the end of the block and the first line of cleanup; our handler would then
    raise here. Retrying until both calls went through guarantees the handler is restored afterwards; a
    trip that is already pending at the C level finds SIG_IGN and is dropped.
    """
    while True:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            return
        except RewardTimeout:
            continue


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
