"""Rollout engines by name (`rollout.engine`): name -> "module:Class", imported when first asked for, so the
name list costs nothing and an engine's optional dependency (vLLM) is only imported by a run that uses it.
Adding an engine is a class implementing `gradus.rollout.engine.RolloutEngine` and one entry here.
"""

from __future__ import annotations

import importlib

from gradus.rollout.engine import RolloutEngine

ENGINES: dict[str, str] = {
    "local": "gradus.rollout.local:LocalEngine",
    "vllm": "gradus.rollout.vllm_engine:VLLMEngine",
}


def engine_class(name: str) -> type[RolloutEngine]:
    """The engine class registered as `name`; ValueError listing the valid names."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; valid: {', '.join(ENGINES)}")
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
