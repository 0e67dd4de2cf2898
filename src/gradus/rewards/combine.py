"""Weighted sum of several rewards, robust to rewards that raise, hang, exit or return absurd values.

``CombinedReward(specs)(prompts, completions, **fields)`` returns a :class:`RewardResult`: the weighted
total per completion, every part per completion (for logging), and how many completions scored 0 because
their reward failed (``errors``) or ran past ``timeout_s`` (``timeouts``).

Every reward runs in worker processes (:mod:`gradus.rewards.pool`), so a time limit holds whatever the reward
does (a C call holding the GIL, a loop that catches ``Exception``), and ``SystemExit``, ``os._exit`` or a
crash in a reward cannot end the trainer. Failure policy (``strict=False``), per reward:
- a completion whose reward raises (any ``BaseException``), ends its worker, or returns a score that is
  not a finite number within ``+-MAX_ABS_SCORE`` (1e308 would become inf in the float32 rewards) scores 0
  and counts as an error; one that runs past ``timeout_s`` scores 0 and counts as a timeout;
- failures are isolated: the batch is scored in chunks, and a chunk that fails is retried one completion at
  a time, so only the completions that fail alone lose their score (details in the pool's docstring);
- the first failure of each reward is logged (logger ``gradus.rewards``) with its traceback or message;
  later ones are only counted, and :meth:`CombinedReward.close` logs each reward's failure totals.
With ``strict=True`` the first failure raises instead (RewardTimeout for a timeout, RewardError else).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradus.rewards.basic import check_batch
from gradus.rewards.pool import Failure, RewardPool
from gradus.rewards.worker import MAX_ABS_SCORE

log = logging.getLogger("gradus.rewards")


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


def parse_reward_specs(text: str | None, default: str | None) -> list[RewardSpec]:
    """'numeric_match:1.0,format:0.1' -> specs (the config's task.rewards); None or '' -> `default`, weight 1."""
    if not text:
        return [RewardSpec(default, 1.0)] if default else []
    specs = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and _is_number(tail):
            name, weight = head, float(tail)
        specs.append(RewardSpec(name, weight))
    return specs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _as_spec(spec: RewardSpec | str | tuple[str, float]) -> RewardSpec:
    if isinstance(spec, RewardSpec):
        return spec
    if isinstance(spec, str):
        return RewardSpec(spec)
    name, weight = spec
    return RewardSpec(name, float(weight))


class CombinedReward:
    """Weighted sum of rewards with time limits and error isolation (policy: module docstring).

    Starts its worker processes at once (a reward that cannot be imported or built is a ValueError here);
    call :meth:`close` (or use it as a context manager) to stop them when done.
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec | str | tuple[str, float]],
        *,
        timeout_s: float | None = 10.0,
        strict: bool = False,
        workers: int | None = None,
    ) -> None:
        if not specs:
            raise ValueError("CombinedReward needs at least one reward")
        self.specs = [_as_spec(s) for s in specs]
        for spec in self.specs:
            if not abs(spec.weight) <= MAX_ABS_SCORE:  # so that no weighted total can overflow
                raise ValueError(
                    f"reward {spec.name_or_path!r}: weight {spec.weight} is not within +-{MAX_ABS_SCORE:g}"
                )
        self.timeout_s = timeout_s
        self.strict = strict
        self.labels: list[str] = []
        for spec in self.specs:
            label, k = spec.name_or_path, 2
            while label in self.labels:  # the same reward twice (e.g. two format regexes): keep both parts
                label, k = f"{spec.name_or_path}#{k}", k + 1
            self.labels.append(label)
        self.failures = {label: {"error": 0, "timeout": 0} for label in self.labels}
        self.pool = RewardPool(
            [(s.name_or_path, s.options) for s in self.specs], self.labels, timeout_s=timeout_s, workers=workers
        )

    def close(self) -> None:
        """Stop the workers and log how often each reward failed (if it did)."""
        self.pool.close()
        for label, count in self.failures.items():
            if count["error"] or count["timeout"]:
                log.warning("reward %r failed on %d completion(s) and timed out on %d in this run",
                            label, count["error"], count["timeout"])
                count["error"] = count["timeout"] = 0

    def __enter__(self) -> CombinedReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardResult:
        n = len(completions)
        check_batch(completions, prompts=prompts, **fields)
        columns = {k: list(v) for k, v in fields.items()}
        parts: dict[str, list[float]] = {}
        errors = timeouts = 0
        for k, label in enumerate(self.labels):
            parts[label], e, t = self.score_part(k, prompts, completions, columns)
            errors += e
            timeouts += t
        total = [
            sum(spec.weight * parts[label][i] for spec, label in zip(self.specs, self.labels, strict=True))
            for i in range(n)
        ]
        return RewardResult(total=total, parts=parts, errors=errors, timeouts=timeouts)

    def score_part(
        self, k: int, prompts: Sequence[str], completions: Sequence[str], fields: dict[str, list[Any]]
    ) -> tuple[list[float], int, int]:
        """Unweighted scores of reward ``k`` alone (0 where it failed), and its numbers of errors and timeouts."""
        label = self.labels[k]
        got = self.pool.score(k, list(prompts), list(completions), fields, strict=self.strict)
        scores, errors, timeouts = [], 0, 0
        for i, value in enumerate(got):
            if isinstance(value, Failure):
                self._record(label, i, value)
                errors += value.kind == "error"
                timeouts += value.kind == "timeout"
                value = 0.0
            scores.append(value)
        return scores, errors, timeouts

    def _record(self, label: str, i: int, failure: Failure) -> None:
        """Count a failure; log the first one of each reward in full."""
        count = self.failures[label]
        if not count["error"] and not count["timeout"]:
            counted = "reward/timeouts" if failure.kind == "timeout" else "reward/errors"
            log.warning(
                "reward %r failed on completion %d of a batch; it scores 0 (counted in %s; further failures of "
                "this reward are only counted):\n%s", label, i, counted, failure.detail.rstrip(),
            )
        count[failure.kind] += 1
