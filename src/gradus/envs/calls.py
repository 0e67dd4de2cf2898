"""Environment calls in worker processes: `reset`, `step` and tool calls, under a time limit, isolated.

The reward workers' pool (`gradus.rewards.pool`) runs them: every call is one item of a batch, a batch is cut
into one chunk per worker, a chunk that fails is retried item by item, and an item that fails alone (raises,
answers something that is not a `Step`, hangs past `timeout_s`, or ends its worker) comes back as a `Failure`
that names what went wrong. So a hostile environment or tool costs its own episode, never the run.

Worker side: `build_env_calls(spec, **options)` builds the environment once per worker and returns the function
the pool calls with two parallel lists, the operations and their payloads:

    ("describe", None)        -> {"name": str, "tools": {name: the first line of its docstring},
                                  "own_reset": False when it keeps `BaseEnvironment.reset` (the state is the
                                  example, and the parent skips the round trip)}
    ("reset", example)        -> the episode's state (it must pickle)
    ("step", (state, action)) -> a checked `Step`
    ("tool", (name, argument))-> the tool's text

Environments are named like rewards: a built-in name (`ENVIRONMENTS`), "module:Class", or
"path/to/file.py:Class" (imported from that file).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradus.envs.base import BadStep, BaseEnvironment, check_state, check_step
from gradus.rewards.pool import Failure, RewardPool

# built-in environments: name -> "module:Class", imported when used
ENVIRONMENTS: dict[str, str] = {
    "guess": "gradus.envs.guess:GuessEnv",
}
_TOOL_TEXT_LIMIT = 20_000  # characters of a tool's answer kept (the rest would only fill the model's positions)


def load_env_class(spec: str) -> type:
    """The environment class `spec` names (module docstring); ValueError saying what is wrong otherwise."""
    target = ENVIRONMENTS.get(spec, spec)
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"environment {spec!r}: write a built-in name ({', '.join(sorted(ENVIRONMENTS))}), "
                         "'module:Class' or 'path/to/file.py:Class'")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"environment {spec!r}: no file {path}")
        try:
            loader = importlib.util.spec_from_file_location(f"gradus_env_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
            sys.modules[loader.name] = module  # type: ignore[union-attr]
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - any error in the user's file is reported with the file
            raise ValueError(f"environment {spec!r}: {path} does not import: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"environment {spec!r}: cannot import {where!r}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ValueError(f"environment {spec!r}: {where} has no class {attr!r}")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not missing and cls.step is BaseEnvironment.step:
        missing = ["step"]  # the base class's, which only says it is missing
    if missing:
        raise ValueError(f"environment {spec!r}: {attr} has no {' or '.join(missing)} method "
                         "(see gradus.envs.Environment)")
    return cls


def build_env_calls(spec: str, **options: Any) -> Callable[[Sequence[str], Sequence[Any]], list[Any]]:
    """In a worker: build the environment and return the function that serves the pool's batches."""
    cls = load_env_class(spec)
    try:
        env = cls(**options)
    except Exception as exc:  # noqa: BLE001 - bad options or a constructor that fails: a config error
        raise ValueError(f"environment {spec!r}: {cls.__name__}({options}) failed: {type(exc).__name__}: {exc}") \
            from None
    tools = dict(getattr(env, "tools", None) or {})

    def run(op: str, payload: Any) -> Any:
        if op == "describe":
            return {"name": str(getattr(env, "name", cls.__name__)),
                    "tools": {name: _first_line(getattr(fn, "__doc__", None)) for name, fn in sorted(tools.items())},
                    "own_reset": getattr(type(env), "reset", None) is not BaseEnvironment.reset}
        if op == "reset":
            state = env.reset(payload)
            check_state(state)
            return state
        if op == "step":
            state, action = payload
            return check_step(env.step(state, action))
        if op == "tool":
            name, argument = payload
            if name not in tools:
                raise BadStep(f"no tool {name!r}; this environment has {', '.join(sorted(tools)) or 'none'}")
            answer = tools[name](argument)
            if not isinstance(answer, str):
                raise BadStep(f"tool {name!r} returned {type(answer).__name__}, not text")
            return answer[:_TOOL_TEXT_LIMIT]
        raise ValueError(f"unknown environment operation {op!r}")

    def calls(ops: Sequence[str], payloads: Sequence[Any], **_: Any) -> list[Any]:
        return [run(op, payload) for op, payload in zip(ops, payloads, strict=True)]

    return calls


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def check_results(results: Any, n: int) -> list[Any]:
    """The pool's check of a worker's answer: one result per call (each call checked its own already)."""
    if not isinstance(results, list) or len(results) != n:
        raise BadStep(f"answered {type(results).__name__} for {n} calls")
    return results


class EnvCalls:
    """The parent's side: an environment's calls run by a pool of workers (module docstring).

    `name` and `tools` come from the environment itself (asked once at start). A spec that does not load is a
    ValueError from the constructor, before any work."""

    def __init__(self, spec: str, options: dict[str, Any] | None = None, *, timeout_s: float,
                 workers: int | None = None) -> None:
        self.spec = spec
        self.pool = RewardPool([(spec, dict(options or {}))], [spec], timeout_s=timeout_s, workers=workers,
                               build="gradus.envs.calls:build_env_calls", check="gradus.envs.calls:check_results",
                               what="environment")
        self.timeout_s = timeout_s
        try:
            described = self.call([("describe", None)])[0]
            if isinstance(described, Failure):
                raise ValueError(f"environment {spec!r}: {described.detail}")
        except BaseException:
            self.pool.close()
            raise
        self.name: str = described["name"]
        self.tools: list[str] = list(described["tools"])
        self.tool_docs: dict[str, str] = dict(described["tools"])  # each tool's docstring's first line
        self.own_reset: bool = described["own_reset"]  # False: `reset` returns the example (no call needed)

    def tool_schemas(self) -> list[dict] | None:
        """The tools as the function schemas chat templates list (one text argument each); None without tools."""
        if not self.tools:
            return None
        return [{"type": "function", "function": {
            "name": name, "description": self.tool_docs[name],
            "parameters": {"type": "object", "properties": {"argument": {"type": "string"}},
                           "required": ["argument"]}}} for name in self.tools]

    def reset(self, examples: Sequence[Any]) -> list[Any]:
        """Each example's first state, or its `Failure`: the base class's `reset` (the example) without a round
        trip to the workers."""
        return self.call([("reset", ex) for ex in examples]) if self.own_reset else list(examples)

    def call(self, items: Sequence[tuple[str, Any]]) -> list[Any]:
        """Each (operation, payload)'s result, or its `Failure`, in order."""
        if not items:
            return []
        ops, payloads = [op for op, _ in items], [p for _, p in items]
        return self.pool.score(0, ops, payloads, {})

    def close(self) -> None:
        self.pool.close()

    @property
    def pids(self) -> list[int]:
        return self.pool.pids()
