"""``math_equivalent``: is the completion's final answer mathematically equal to the reference answer?

This is the seed's ``is_equivalent(a, o)``. The final answer is extracted (``extract.extract_answer``:
last ``\\boxed{}``, else "answer is X", else the last number). Two plain numbers are compared exactly with
Fraction (fast, no sympy; so ``0.333333 != 1/3``); anything else goes through ``math_verify`` (parse both
sides as LaTeX, then ``verify``). So ``1/2``, ``0.5`` and ``\\frac{1}{2}`` agree, as do ``2`` and ``2.0``,
``-0`` and ``0``, ``1,000`` and ``1000``. A missing answer, garbage, or an error inside math_verify scores 0.

Time limits: in the main thread (a reward worker's only thread), math_verify's own per-expression limit
(``signal.alarm``, whole seconds: ``timeout_s`` rounded up) stops slow pure-Python sympy work, and the
completion scores 0. It cannot stop a C call that holds the GIL (``9^{9^{9^9}}``, ``100000000!``); the
reward worker's limit, which kills the process, does (``gradus.rewards.pool``). In other threads
math_verify cannot use signals, so it runs with no limit of its own.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from gradus.rewards.basic import RewardFn, check_batch
from gradus.rewards.extract import extract_answer, last_boxed, parse_number


def _as_latex(text: str) -> str:
    # math_verify finds expressions inside math delimiters most reliably ('\dfrac{3}{4}' alone parses to []).
    return text if "$" in text else f"${text}$"


def _verify(gold: str, pred: str, timeout_s: float | None) -> bool:
    from math_verify import parse, verify

    seconds = None  # math_verify's limits use signal.alarm: main thread only, whole seconds
    if timeout_s is not None and timeout_s > 0 and threading.current_thread() is threading.main_thread():
        seconds = max(1, math.ceil(timeout_s))
    gold_parsed = parse(_as_latex(gold), parsing_timeout=seconds)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=seconds)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


def is_equivalent(answer: str, completion: str, timeout_s: float | None = 2.0) -> bool:
    """True when the completion's final answer equals ``answer`` mathematically (see module docstring)."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    gold = last_boxed(answer) or answer.strip()
    x, y = parse_number(gold), parse_number(pred)
    if x is not None and y is not None:
        return x == y
    try:
        return _verify(gold, pred, timeout_s)
    except Exception:  # math_verify may raise on exotic input (sympy errors): a wrong answer, not a crash
        return False


def make_math_equivalent(timeout_s: float | None = 2.0) -> RewardFn:
    """Batched ``is_equivalent``; ``timeout_s`` limits the math_verify step of each completion (module docstring)."""
    # Imported by the factory, not with the module: math_verify (with its LaTeX grammar) adds tens of MiB to
    # every process that imports gradus.rewards, e.g. a countdown run that never needs it. Here, so that a
    # reward worker pays the one-off import when it starts, not inside a call's time limit.
    import math_verify  # noqa: F401

    def math_equivalent(
        prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str], **_fields: Any
    ) -> list[float]:
        check_batch(completions, answer=answer)
        return [float(is_equivalent(str(a), c, timeout_s)) for c, a in zip(completions, answer, strict=True)]

    return math_equivalent
