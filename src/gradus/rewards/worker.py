"""The reward worker: a separate Python process that builds the rewards and scores batches on request.

Started by :class:`gradus.rewards.pool.RewardPool` as ``python -c`` (a fresh interpreter: nothing of the
parent's torch threads or ``__main__`` script comes with it). It talks to the pool over one socket
(``multiprocessing.connection``, pickled messages):

1. receives ``{"sys_path", "specs", "build", "check", "parent_pid", "die_with_parent"}``, sets ``sys.path`` to
   the parent's (so ``module:function`` rewards import the same files) and builds every reward with ``build``
   (``get_reward``; an environment pool builds its environments' calls, ``gradus.envs.calls``);
2. answers ``("ready", None)``, or ``("init_error", message)`` and exits;
3. then, for each request ``(k, prompts, completions, fields)``, calls reward ``k`` on the batch and
   answers ``("ok", check(scores, n))`` or ``("error", message)``. Any ``BaseException`` the reward raises
   (``SystemExit`` and ``KeyboardInterrupt`` included) is an error answer, never the end of the worker.

Scores are checked here (:func:`check_scores`): one per completion, each a finite float with
``|score| <= MAX_ABS_SCORE``; anything else is an error of the reward.

The worker never outlives the pool's process: a thread watches a lifeline (the worker's stdin, a pipe
whose write end only the parent holds) and exits at its end-of-file; that thread needs the GIL, so on
Linux the kernel also kills the worker when its parent dies (``PR_SET_PDEATHSIG``), which works even
while a C call (a huge ``int`` power) holds the GIL. Ctrl-C is ignored here: the trainer handles it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

MAX_ABS_SCORE = 1e6
"""Largest reward magnitude accepted. Larger values are an error of the reward: a score near 1e308
becomes inf in the float32 rewards, and the squares in the advantages' std overflow long before that."""
# what a worker builds its functions with, and checks their answers with, unless the pool says otherwise
_BUILD, _CHECK = "gradus.rewards:get_reward", "gradus.rewards.worker:check_scores"
_MAX_MESSAGE = 20_000  # characters of an error message sent back (a traceback may quote a whole completion)


class BadScores(ValueError):
    """A reward's return value is not one acceptable score per completion."""


def check_scores(scores: Any, n: int) -> list[float]:
    """One finite float per completion, each within ``MAX_ABS_SCORE``; BadScores otherwise."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as exc:
        raise BadScores(f"returned {type(scores).__name__} that is not a list of numbers ({exc})") from None
    if len(values) != n:
        raise BadScores(f"returned {len(values)} scores for {n} completions")
    for v in values:
        if not math.isfinite(v) or abs(v) > MAX_ABS_SCORE:
            raise BadScores(
                f"returned the score {v!r}: a reward must be a finite number within "
                f"+-{MAX_ABS_SCORE:g} (larger values overflow the float32 rewards and advantages)"
            )
    return values


def _message(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, BadScores) else "".join(traceback.format_exception(exc))
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE // 2] + "\n[...]\n" + text[-_MAX_MESSAGE // 2 :]


def _call(fn: Any, check: Any, prompts: Sequence[Any], completions: Sequence[Any],
          fields: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", check(fn(prompts, completions, **fields), len(completions))
    except BaseException as exc:  # SystemExit, KeyboardInterrupt too: an error of this reward, not our end
        return "error", _message(exc)


def _watch_lifeline(fd: int) -> None:
    while os.read(fd, 4096):
        pass
    os._exit(0)  # the pool's process closed the pipe or died


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the thread that started it ends (the parent's main thread)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl ran
        os._exit(0)


def main(fd: int) -> None:
    """Worker loop on the connection with file descriptor ``fd`` (protocol: module docstring)."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lifeline = os.dup(0)  # user code that reads stdin gets /dev/null, not the lifeline
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    conn = Connection(fd)
    try:
        _serve(conn)
    except (EOFError, OSError):  # the pool closed the connection (or died): nothing left to do
        pass


def _serve(conn: Any) -> None:
    init = conn.recv()
    if init["die_with_parent"]:
        _die_with_parent(init["parent_pid"])
    sys.path[:] = init["sys_path"]
    try:
        build, check = _import(init.get("build", _BUILD)), _import(init.get("check", _CHECK))
        fns = [build(name, **options) for name, options in init["specs"]]
    except BaseException as exc:  # a reward that cannot be built is a config error, reported by the pool
        conn.send(("init_error", str(exc) if isinstance(exc, ValueError) else _message(exc)))
        return
    conn.send(("ready", None))
    while True:
        k, prompts, completions, fields = conn.recv()
        conn.send(_call(fns[k], check, prompts, completions, fields))


def _import(path: str) -> Any:
    """The function at "module:name" (how the pool names what its workers build and check)."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
