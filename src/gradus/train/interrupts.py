"""Ctrl-C and SIGTERM during training: finish the step in progress, save it, stop.

A signal that raised at an arbitrary point would leave a half-done step (some minibatches applied,
the data position moved on) that no checkpoint may hold. So the first SIGINT or SIGTERM only sets
`StopSignals.requested`; the trainer looks at it between steps and then saves a checkpoint that
is exactly a completed step's state. A second signal raises KeyboardInterrupt at once: the step in
progress is abandoned and nothing is saved, so the newest checkpoint stays the last good one.

Signal handlers can only be installed from the main thread; elsewhere `StopSignals` does nothing
(signals are only ever delivered to the main thread anyway).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after finishing and saving step `step`. A KeyboardInterrupt, so
    callers that already stop on Ctrl-C (the compare runner, the CLI) stop on this too."""

    def __init__(self, message: str, *, signum: int, step: int, run_dir: Path):
        super().__init__(message)
        self.signum, self.step, self.run_dir = signum, step, run_dir


class StopSignals:
    """Context manager: SIGINT/SIGTERM request a stop instead of raising; the previous handlers come
    back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None: a handler not installed from Python; the default is the closest we can restore
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler that prints while the interrupted code is printing (the
        # progress bar) would raise "reentrant call" from inside the buffered writer
        _say(f"\ngradus: {signal.Signals(signum).name}: finishing the current step, then saving a "
             "checkpoint and stopping (press Ctrl-C again to quit at once without saving)\n")


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank gets the signal; rank 0 speaks
        return
    try:
        os.write(2, text.encode())
    except OSError:
        pass
