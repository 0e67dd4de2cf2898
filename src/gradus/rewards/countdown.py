"""Countdown reward: does the completion's expression reach the target with the given numbers?

Model output is never executed. The expression is checked in layers, each cheap and bounded:
1. length <= ``MAX_EXPR_CHARS`` and only the characters ``0-9 + - * / ( )`` and spaces (this alone rejects
   names, attribute access, calls, lambdas, strings, ``**`` is caught in step 3);
2. parenthesis nesting <= ``MAX_DEPTH``;
3. ``ast.parse(mode="eval")`` (parsing does not evaluate or constant-fold anything), then a walk that
   accepts only ``BinOp`` with ``+ - * /`` and non-negative ``int`` constants; unary minus is rejected, so
   every number is one of the given ones as written;
4. each number used at most as many times as it is given (multiset), and only given numbers;
5. exact evaluation with ``fractions.Fraction`` (``6/4*2 == 3``); division by zero scores 0.
Score 1.0 when the value equals the target exactly, else 0.0. Not every number has to be used.

The expression is taken from the completion as: the last ``\\boxed{...}``, else the last
``<answer>...</answer>``, else the last non-empty line; a trailing ``= <value>`` is dropped.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from gradus.rewards.basic import check_batch
from gradus.rewards.extract import last_boxed

MAX_EXPR_CHARS = 256
MAX_DEPTH = 16
_ALLOWED = re.compile(r"[0-9+\-*/() ]+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPS = {
    ast.Add: Fraction.__add__,
    ast.Sub: Fraction.__sub__,
    ast.Mult: Fraction.__mul__,
    ast.Div: Fraction.__truediv__,
}
_UNICODE_OPS = str.maketrans({"×": "*", "÷": "/", "−": "-", "\t": " "})


class _Invalid(Exception):
    """The expression is not an allowed countdown expression."""


def countdown_expression(completion: str) -> str:
    """The expression part of a completion (rules in the module docstring)."""
    text = last_boxed(completion)
    if text is None:
        tags = _ANSWER_TAG.findall(completion[-10 * MAX_EXPR_CHARS :])
        if tags:
            text = tags[-1]
        else:
            lines = [line for line in completion.splitlines() if line.strip()]
            text = lines[-1] if lines else ""
    return text.split("=")[0].strip()


def _paren_depth(expr: str) -> int:
    depth = deepest = 0
    for ch in expr:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an allowed node, appending each number literal to ``used``; _Invalid otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _evaluate(node.left, used)
        right = _evaluate(node.right, used)
        return _OPS[type(node.op)](left, right)
    raise _Invalid(type(node).__name__)


def countdown_value(expr: str, numbers: Sequence[int]) -> Fraction | None:
    """Exact value of ``expr`` if it is a valid expression over ``numbers``; None if not (or 1/0)."""
    expr = expr.translate(_UNICODE_OPS).strip()
    if not expr or len(expr) > MAX_EXPR_CHARS or not _ALLOWED.fullmatch(expr):
        return None
    if _paren_depth(expr) > MAX_DEPTH:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used: list[int] = []
    try:
        value = _evaluate(tree.body, used)
    except (_Invalid, ZeroDivisionError):
        return None
    available = Counter(int(n) for n in numbers)
    if any(count > available[n] for n, count in Counter(used).items()):
        return None
    return value


def countdown_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    numbers: Sequence[Sequence[int]],
    target: Sequence[int | str],
    **_fields: Any,
) -> list[float]:
    """1.0 where the completion's expression reaches ``target`` using only ``numbers``, else 0.0."""
    check_batch(completions, numbers=numbers, target=target)
    scores = []
    for completion, nums, goal in zip(completions, numbers, target, strict=True):
        value = countdown_value(countdown_expression(completion), nums)
        scores.append(float(value is not None and value == Fraction(goal)))
    return scores
