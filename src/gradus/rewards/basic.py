"""Simple rewards: exact string match, exact numeric match, and a format check.

Every reward here is batched and pure: ``fn(prompts, completions, **fields) -> list[float]``, one score per
completion. The factories take configuration; the functions they return take only data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from gradus.rewards.extract import last_boxed, parse_number

RewardFn = Callable[..., list[float]]


def check_batch(completions: Sequence[str], **columns: Sequence[Any]) -> None:
    """Raise ValueError unless every per-completion column has one entry per completion."""
    for name, column in columns.items():
        if len(column) != len(completions):
            raise ValueError(f"field {name!r} has {len(column)} entries for {len(completions)} completions")


def numbers_equal(a: str, b: str) -> bool:
    """True when both strings are plain numbers with the same exact value ('3' == '3.0' == '6/2')."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def make_exact_match(numeric: bool = False) -> RewardFn:
    """1.0 where the stripped completion equals the stripped answer, else 0.0.

    With ``numeric=True`` both sides must instead be plain numbers (see ``parse_number``) of equal value,
    compared exactly with Fraction: '3' == '3.0' == '6/2', '-0' == '0', '1,000' == '1000'. Nothing is
    extracted from the completion: the whole completion is the answer (what the arithmetic task trains).
    """

    def exact_match(
        prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str], **_fields: Any
    ) -> list[float]:
        check_batch(completions, answer=answer)
        if numeric:
            return [float(numbers_equal(c, str(a))) for c, a in zip(completions, answer, strict=True)]
        return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]

    exact_match.__name__ = "numeric_match" if numeric else "exact_match"
    return exact_match


def make_numeric_match() -> RewardFn:
    """``exact_match`` with ``numeric=True``: the fast exact check used by the arithmetic task."""
    return make_exact_match(numeric=True)


def make_format_reward(pattern: str | None = None, fullmatch: bool = False) -> RewardFn:
    """1.0 where the completion has the expected format, else 0.0.

    Default (``pattern=None``): the completion contains a closed ``\\boxed{...}`` with non-empty content.
    Otherwise ``pattern`` is a regular expression (DOTALL) that must be found in the completion, or match all
    of it when ``fullmatch=True``.
    """
    regex = re.compile(pattern, re.DOTALL) if pattern is not None else None

    def format_reward(prompts: Sequence[str], completions: Sequence[str], **_fields: Any) -> list[float]:
        if regex is None:
            return [float(bool(last_boxed(c))) for c in completions]
        match = regex.fullmatch if fullmatch else regex.search
        return [float(match(c) is not None) for c in completions]

    return format_reward
