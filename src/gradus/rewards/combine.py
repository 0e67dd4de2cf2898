"""Weighted sum of several rewards, robust to rewards that raise or hang.

``CombinedReward(specs)(prompts, completions, **fields)`` returns a :class:`RewardResult`: the weighted
total per completion, every part per completion (for logging), and how many completions scored 0 because
their reward raised (``errors``) or ran past ``timeout_s`` (``timeouts``).

Failure policy (``strict=False``), per reward:
- the reward is first called once on the whole batch under a ``timeout_s`` wall-clock limit;
- if that call raises (or returns something that is not one finite number per completion), it is called
  again one completion at a time, each under ``timeout_s``, so one bad completion does not zero its batch;
  completions that still fail score 0 and count as errors (or timeouts);
- if the batch call runs past the limit, the WHOLE BATCH scores 0 for that reward and every completion in
  it counts as a timeout (retrying one at a time could cost up to n times the limit).
With ``strict=True`` the first failure is re-raised instead (RewardTimeout for a timeout).
The time limit is ``gradus.rewards.timelimit.call_with_time_limit`` (SIGALRM timer in the main thread,
worker thread fallback elsewhere); see that module for why it stops runaway pure-Python code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradus.rewards.basic import RewardFn, check_batch
from gradus.rewards.timelimit import RewardTimeout, call_with_time_limit


@dataclass(frozen=True)
class RewardSpec:
    """One reward in a combination."""

    name_or_path: str
    """A registered reward name (``gradus.rewards.available_rewards()``) or ``"module:function"``."""
    weight: float = 1.0
    """Multiplies this reward's scores in the total."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options for the reward's factory (e.g. ``{"pattern": "^\\\\d+$"}`` for ``format``)."""


@dataclass
class RewardResult:
    """Scores of one batch: ``total[i] = sum_k weight_k * parts[k][i]``."""

    total: list[float]
    parts: dict[str, list[float]]
    errors: int
    timeouts: int

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means of the total and of every part, plus the failure counts, for a logger."""
        n = max(len(self.total), 1)
        out = {f"{prefix}total": sum(self.total) / n}
        out.update({f"{prefix}{name}": sum(v) / n for name, v in self.parts.items()})
        out[f"{prefix}errors"] = float(self.errors)
        out[f"{prefix}timeouts"] = float(self.timeouts)
        return out


def _validated(scores: Any, n: int) -> list[float]:
    """One finite float per completion, or TypeError/ValueError (treated like the reward raising)."""
    values = [float(s) for s in scores]
    if len(values) != n:
        raise ValueError(f"reward returned {len(values)} scores for {n} completions")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("reward returned a non-finite score")
    return values


def _as_spec(spec: RewardSpec | str | tuple[str, float]) -> RewardSpec:
    if isinstance(spec, RewardSpec):
        return spec
    if isinstance(spec, str):
        return RewardSpec(spec)
    name, weight = spec
    return RewardSpec(name, float(weight))


class CombinedReward:
    """Weighted sum of rewards with per-call time limits and error isolation (policy: module docstring)."""

    def __init__(
        self,
        specs: Sequence[RewardSpec | str | tuple[str, float]],
        *,
        timeout_s: float | None = 10.0,
        strict: bool = False,
    ) -> None:
        from gradus.rewards import get_reward  # the registry imports this module

        if not specs:
            raise ValueError("CombinedReward needs at least one reward")
        self.specs = [_as_spec(s) for s in specs]
        self.timeout_s = timeout_s
        self.strict = strict
        self.labels: list[str] = []
        for spec in self.specs:
            label, k = spec.name_or_path, 2
            while label in self.labels:  # the same reward twice (e.g. two format regexes): keep both parts
                label, k = f"{spec.name_or_path}#{k}", k + 1
            self.labels.append(label)
        self.fns: list[RewardFn] = [get_reward(s.name_or_path, **s.options) for s in self.specs]

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardResult:
        n = len(completions)
        check_batch(completions, prompts=prompts, **fields)
        parts: dict[str, list[float]] = {}
        errors = timeouts = 0
        for label, fn in zip(self.labels, self.fns, strict=True):
            scores, e, t = self._score(
                fn, list(prompts), list(completions), {k: list(v) for k, v in fields.items()}
            )
            parts[label] = scores
            errors += e
            timeouts += t
        total = [
            sum(spec.weight * parts[label][i] for spec, label in zip(self.specs, self.labels, strict=True))
            for i in range(n)
        ]
        return RewardResult(total=total, parts=parts, errors=errors, timeouts=timeouts)

    def _score(
        self, fn: RewardFn, prompts: list[str], completions: list[str], fields: dict[str, list[Any]]
    ) -> tuple[list[float], int, int]:
        """Scores of one reward on the batch, and how many completions errored / timed out."""
        n = len(completions)
        try:
            return (
                _validated(call_with_time_limit(fn, self.timeout_s, prompts, completions, **fields), n),
                0,
                0,
            )
        except RewardTimeout:
            if self.strict:
                raise
            return [0.0] * n, 0, n
        except Exception:
            if self.strict:
                raise
        scores, errors, timeouts = [], 0, 0
        for i in range(n):
            one = {k: v[i : i + 1] for k, v in fields.items()}
            try:
                got = call_with_time_limit(
                    fn, self.timeout_s, prompts[i : i + 1], completions[i : i + 1], **one
                )
                scores.append(_validated(got, 1)[0])
            except RewardTimeout:
                scores.append(0.0)
                timeouts += 1
            except Exception:
                scores.append(0.0)
                errors += 1
        return scores, errors, timeouts
