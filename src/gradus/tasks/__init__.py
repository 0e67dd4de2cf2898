"""Tasks: where training problems, held-out problems and prompts come from.

``get_task(name, **kwargs)`` builds a registered task; an unknown name raises ValueError listing the valid
ones. Every task has ``name``, ``default_reward`` (a name in ``gradus.rewards``), ``train_example(index)``,
``heldout(n)`` and ``render_prompt(example, tokenizer)``; ``reward_fields(examples)`` turns a batch into the
keyword fields rewards take (``answer`` and the meta keys).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradus.tasks.arithmetic import ArithmeticTask
from gradus.tasks.base import Example, ProceduralTask, Task, reward_fields
from gradus.tasks.countdown import CountdownTask
from gradus.tasks.files import DatasetError, FileTask
from gradus.tasks.guess import GuessTask

MATH_TEMPLATE = "{prompt}\nPut the final answer in \\boxed{}."


def math_word_problems_path() -> Path:
    """The grade-school word problems shipped with gradus (fields question, answer, solution)."""
    return Path(str(importlib.resources.files("gradus") / "data" / "math_word_problems.jsonl"))


def math_file_task(**kwargs: Any) -> FileTask:
    """FileTask over the shipped word problems, scored with ``math_equivalent``; kwargs override defaults."""
    options: dict[str, Any] = {
        "path": math_word_problems_path(),
        "template": MATH_TEMPLATE,
        "default_reward": "math_equivalent",
        "name": "math_file",
        "heldout_fraction": 0.2,
    }
    options.update(kwargs)
    return FileTask(**options)


_REGISTRY: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "file": FileTask,
    "guess": GuessTask,
    "math_file": math_file_task,
}


def available_tasks() -> list[str]:
    """Registered task names."""
    return sorted(_REGISTRY)


def task_class(name: str) -> Callable[..., Task]:
    """What builds the task registered as ``name`` (a class, or a function for a preset of one)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(available_tasks())}")
    return _REGISTRY[name]


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with constructor keyword arguments ``kwargs``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(available_tasks())}")
    return _REGISTRY[name](**kwargs)


__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "DatasetError",
    "Example",
    "FileTask",
    "GuessTask",
    "ProceduralTask",
    "Task",
    "available_tasks",
    "get_task",
    "task_class",
    "math_file_task",
    "math_word_problems_path",
    "reward_fields",
]
