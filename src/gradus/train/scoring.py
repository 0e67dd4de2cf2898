"""Scoring sampled completions: the task's rewards, correctness, and DAPO's overlong shaping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradus.rewards import CombinedReward, RewardSpec
from gradus.rewards.shaping import with_overlong_penalty
from gradus.rollout import RolloutBatch
from gradus.tasks import Example, Task, reward_fields


@dataclass
class Scores:
    rewards: torch.Tensor  # [N] float32, what advantages are computed from: parts @ weights
    correct: torch.Tensor  # [N] bool, the task's own verifier says right
    metrics: dict[str, float]
    parts: torch.Tensor  # [N, K] float32, each reward's own score (task.rewards' order; then DAPO's length penalty)
    weights: tuple[float, ...]  # [K] the weight of each part in `rewards`

    def select(self, rows: torch.Tensor) -> Scores:
        return Scores(self.rewards[rows], self.correct[rows], self.metrics, self.parts[rows], self.weights)


class Scorer:
    """Scores completions with the configured rewards; correctness always uses the task's verifier.

    Every reward, the verifier included, runs in the reward workers (``gradus.rewards.pool``), under the
    time limit; when the verifier is not one of the rewards it is scored as an extra part of weight 0 and
    left out of the logged parts. Call :meth:`close` to stop the workers.
    """

    def __init__(self, task: Task, specs: list[RewardSpec], *, timeout_s: float, strict: bool,
                 workers: int | None = None):
        self.task = task
        self._extra = not any(s.name_or_path == task.default_reward for s in specs)
        extra = [RewardSpec(task.default_reward, 0.0)] if self._extra else []
        self.reward = CombinedReward(specs + extra, timeout_s=timeout_s, strict=strict, workers=workers)
        self._verifier_part = next(label for label, s in zip(self.reward.labels, self.reward.specs, strict=True)
                                   if s.name_or_path == task.default_reward)

    def close(self) -> None:
        self.reward.close()

    def completions_text(self, batch: RolloutBatch, tokenizer: Any) -> list[str]:
        ids = [row[:n] for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist(), strict=True)]
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    def score(self, prompts: list[str], completions: list[str], examples: list[Example]) -> Scores:
        result = self.reward(prompts, completions, **reward_fields(examples))
        verdict = result.parts.pop(self._verifier_part) if self._extra else result.parts[self._verifier_part]
        correct = torch.tensor([v >= 1.0 for v in verdict])
        metrics = result.metrics("reward/")
        metrics["reward/accuracy"] = correct.float().mean().item() if len(verdict) else 0.0
        configured = [(label, spec.weight) for label, spec in zip(self.reward.labels, self.reward.specs, strict=True)
                      if label in result.parts]  # the verifier scored only for correctness is not a part
        parts = torch.tensor([result.parts[label] for label, _ in configured], dtype=torch.float32).T  # [N, K]
        return Scores(torch.tensor(result.total, dtype=torch.float32), correct, metrics,
                      parts.reshape(len(result.total), len(configured)), tuple(w for _, w in configured))

    def verify(self, prompts: list[str], completions: list[str], examples: list[Example]) -> list[bool]:
        """The task's verdict per completion (held-out evaluation), under the same limits as training."""
        k = self.reward.labels.index(self._verifier_part)
        scores, _, _ = self.reward.score_part(k, prompts, completions, reward_fields(examples))
        return [v >= 1.0 for v in scores]


def add_overlong_penalty(scores: Scores, lengths: torch.Tensor, *, max_len: int, cache_len: int) -> Scores:
    """DAPO's soft overlong punishment added to the rewards (its mean is logged)."""
    total, penalty = with_overlong_penalty(scores.rewards, lengths, max_len=max_len, cache_len=cache_len)
    metrics = dict(scores.metrics, **{"reward/overlong_penalty": penalty.mean().item()})
    parts = torch.cat([scores.parts, penalty.to(scores.parts.dtype).reshape(-1, 1)], dim=1)  # [N, K + 1]
    return Scores(total, scores.correct, metrics, parts, (*scores.weights, 1.0))

