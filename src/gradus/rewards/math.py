"""``math_equivalent``: is the completion's final answer mathematically equal to the reference answer?

This is the seed's ``is_equivalent(a, o)``. The final answer is extracted (``extract.extract_answer``:
last ``\\boxed{}``, else "answer is X", else the last number). Two plain numbers are compared exactly with
Fraction (fast, no sympy; so ``0.333333 != 1/3``); anything else goes through ``math_verify`` (parse both
sides as LaTeX, then ``verify``), under a time limit per completion. So ``1/2``, ``0.5`` and ``\\frac{1}{2}``
agree, as do ``2`` and ``2.0``, ``-0`` and ``0``, ``1,000`` and ``1000``. A missing answer, garbage, an
error inside math_verify or a timeout score 0.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from gradus.rewards.basic import RewardFn, check_batch
from gradus.rewards.extract import extract_answer, last_boxed, parse_number
from gradus.rewards.timelimit import RewardTimeout, call_with_time_limit, time_limit


def _as_latex(text: str) -> str:
    # math_verify finds expressions inside math delimiters most reliably ('\dfrac{3}{4}' alone parses to []).
    return text if "$" in text else f"${text}$"


def _verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify  # already imported by is_equivalent, outside the time limit

    # math_verify's own timeouts use signal.alarm, which would cancel our ITIMER_REAL limits: disable them.
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def is_equivalent(answer: str, completion: str, timeout_s: float | None = 2.0) -> bool:
    """True when the completion's final answer equals ``answer`` mathematically (see module docstring)."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    gold = last_boxed(answer) or answer.strip()
    x, y = parse_number(gold), parse_number(pred)
    if x is not None and y is not None:
        return x == y
    # Imported on first use, not with the module: math_verify (with its LaTeX grammar) adds tens of MiB to
    # every process that imports gradus.rewards, e.g. a countdown run that never needs it. Here, before
    # the time limit starts, so the one-off import is not charged to a completion's verification.
    import math_verify  # noqa: F401

    if threading.current_thread() is not threading.main_thread():
        try:
            return call_with_time_limit(_verify, timeout_s, gold, pred)
        except Exception:  # our timeout, or math_verify raising on exotic input: a wrong answer, not a crash
            return False
    lim = None
    try:
        with time_limit(timeout_s) as lim:
            return _verify(gold, pred)
    except RewardTimeout as exc:
        if lim is None or exc.limit is not lim:
            raise  # an enclosing limit (e.g. CombinedReward's) expired: it is not ours to swallow
        return False
    except Exception:  # math_verify may raise on exotic input (sympy errors): a wrong answer, not a crash
        return False


def make_math_equivalent(timeout_s: float | None = 2.0) -> RewardFn:
    """Batched ``is_equivalent``; ``timeout_s`` limits the math_verify step of each completion."""

    def math_equivalent(
        prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str], **_fields: Any
    ) -> list[float]:
        check_batch(completions, answer=answer)
        return [float(is_equivalent(str(a), c, timeout_s)) for c, a in zip(completions, answer, strict=True)]

    return math_equivalent
