"""Reward functions and their registry.

A reward is a pure, batched function ``fn(prompts, completions, **fields) -> list[float]`` with one score
per completion; ``fields`` holds per-completion lists: ``answer`` and the task's meta keys (e.g. countdown's
``numbers`` and ``target``). Rewards ignore fields they do not use (they take ``**fields``).

``get_reward(name, **options)`` builds one: ``name`` is a registered name (unknown names raise ValueError
listing the valid ones) or ``"module:function"``, imported with importlib; ``options`` go to the
registered factory (or are bound to the user function as keyword arguments). ``CombinedReward`` sums
several with weights, and runs them in worker processes with time limits and error isolation.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from gradus.rewards.basic import RewardFn, make_exact_match, make_format_reward, make_numeric_match
from gradus.rewards.combine import CombinedReward, RewardResult, RewardSpec, parse_reward_specs
from gradus.rewards.countdown import countdown_reward
from gradus.rewards.extract import extract_answer
from gradus.rewards.math import is_equivalent, make_math_equivalent
from gradus.rewards.pool import RewardError, RewardTimeout


def _no_options(fn: RewardFn) -> Callable[[], RewardFn]:
    """Factory for a reward that has nothing to configure (passing options is then an error)."""

    def factory() -> RewardFn:
        return fn

    return factory


# name -> factory(**options) -> reward function
_REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "math_equivalent": make_math_equivalent,
    "countdown": _no_options(countdown_reward),
    "exact_match": make_exact_match,
    "numeric_match": make_numeric_match,
    "format": make_format_reward,
}


def available_rewards() -> list[str]:
    """Registered reward names."""
    return sorted(_REGISTRY)


def _load_user_reward(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"user reward {path!r} must be written 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for reward {path!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no callable {attr!r} (reward {path!r})")
    return fn


def get_reward(name: str, **options: object) -> RewardFn:
    """Reward function for a registered name or a ``"module:function"`` path (see module docstring)."""
    if ":" in name:
        fn = _load_user_reward(name)
        return functools.partial(fn, **options) if options else fn
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown reward {name!r}; valid: {', '.join(available_rewards())} or 'module:function'"
        )
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:
        raise ValueError(f"bad options {options} for reward {name!r}: {exc}") from exc


__all__ = [
    "CombinedReward",
    "RewardFn",
    "RewardResult",
    "RewardError",
    "RewardSpec",
    "parse_reward_specs",
    "RewardTimeout",
    "available_rewards",
    "countdown_reward",
    "extract_answer",
    "get_reward",
    "is_equivalent",
]
