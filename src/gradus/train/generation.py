"""Steps 1-3 of a training step: take prompts, sample G completions (or multi-turn episodes) each, score them,
and (DAPO) keep sampling until the batch holds enough groups whose rewards are not all equal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradus.algorithm import ResolvedAlgo
from gradus.envs.episodes import EPISODE_COUNTS
from gradus.objectives import dynamic_sampling_keep
from gradus.rollout import RolloutBatch, RolloutEngine, SamplingParams
from gradus.tasks import Example
from gradus.train.data import PromptSource
from gradus.train.rollouts import Episodes, OneTurn
from gradus.train.scoring import Scores, add_overlong_penalty
from gradus.train.stages import StageTimer

# Metrics of `collect` that add up over data-parallel ranks (each rank samples its share of the batch);
# the others are averaged.
SUMMED_OVER_RANKS = ("rollout/tokens", "rollout/tokens_per_s", "dapo/groups_kept", "dapo/groups_dropped",
                     "dapo/batch_short", "actor/tokens_trained", *EPISODE_COUNTS)


@dataclass
class Collected:
    """A scored rollout batch, laid out group by group (G contiguous rows per prompt)."""

    batch: RolloutBatch | None  # None: dynamic sampling found no group with signal
    examples: list[Example]  # one per row
    rewards: torch.Tensor  # [N] float32
    correct: torch.Tensor  # [N] bool
    metrics: dict[str, float]
    reward_parts: torch.Tensor | None = None  # [N, K] each reward's own score (Scores.parts)
    reward_weights: tuple[float, ...] = ()  # [K]


def collect(
    engine: RolloutEngine,
    source: PromptSource,
    rollout: OneTurn | Episodes,
    params: SamplingParams,
    algo: ResolvedAlgo,
    *,
    num_groups: int,
    group_size: int,
    seed: int,
    timer: StageTimer | None = None,
) -> Collected:
    """Sample and score `num_groups` groups; with dynamic sampling, only groups with signal count.

    Dynamic sampling draws up to `algo.max_gen_rounds` rounds of `num_groups` prompts each; if the
    batch is still short after the last round, training goes on with what there is (logged). `seed`
    (31 bits) is the step's: completion s of example i is drawn from the stream keyed by (seed, i, s).
    """
    timer = timer or StageTimer()
    kept: list[tuple[RolloutBatch, list[Example], Scores]] = []
    sampled: list[dict[str, float]] = []  # per round: metrics over every sampled completion
    have, dropped, rounds, tokens, gen_time = 0, 0, 0, 0, 0.0
    max_rounds = algo.max_gen_rounds if algo.dynamic_sampling else 1
    while have < num_groups and rounds < max_rounds:
        prompts = source.next(num_groups)
        before = timer.seconds["rollout"]
        # each prompt's randomness is keyed by (step seed, example index): the same on any rank or world size
        batch, examples, scores = rollout.sample(engine, prompts, group_size, params,
                                                 [(seed << 32) | i for i in prompts.indices], timer)
        gen_time += timer.seconds["rollout"] - before
        tokens += batch.num_completion_tokens
        rounds += 1
        if algo.overlong_shaping:
            with timer("score"):
                scores = add_overlong_penalty(scores, batch.lengths, max_len=rollout.overlong_limit(params),
                                              cache_len=algo.overlong_cache)
        sampled.append(_sample_metrics(batch, scores))
        if algo.dynamic_sampling:
            keep_groups = dynamic_sampling_keep(scores.rewards, group_size)  # [num_groups]
            keep_groups[keep_groups.cumsum(0) > num_groups - have] = False  # no more than needed
            dropped += int((~keep_groups).sum())
            if not keep_groups.any():
                continue
            idx = keep_groups.repeat_interleave(group_size).nonzero().squeeze(1)  # [kept rows]
            batch = batch.select(idx.to(batch.device))
            examples = [examples[i] for i in idx.tolist()]
            scores = scores.select(idx)
        kept.append((batch, examples, scores))
        have += batch.batch_size // group_size

    # per sampling round: counts add up over the rounds, the rest is their mean
    metrics = {k: sum(m[k] for m in sampled) / (1 if k in EPISODE_COUNTS else len(sampled)) for k in sampled[0]}
    metrics.update({
        "rollout/tokens": float(tokens),
        "rollout/gen_seconds": gen_time,  # the rollout stage (with an environment's turns)
        "rollout/tokens_per_s": tokens / gen_time if gen_time > 0 else 0.0,
    })
    if algo.dynamic_sampling:
        metrics.update({"dapo/rounds": float(rounds), "dapo/groups_dropped": float(dropped),
                        "dapo/groups_kept": float(have), "dapo/batch_short": float(num_groups - have)})
    if not kept:  # no group with any signal: nothing to train on this step
        return Collected(None, [], torch.zeros(0), torch.zeros(0, dtype=torch.bool), metrics)
    return Collected(
        batch=RolloutBatch.concat([b for b, _, _ in kept]).trim(),
        examples=[e for _, ex, _ in kept for e in ex],
        rewards=torch.cat([s.rewards for _, _, s in kept]),
        correct=torch.cat([s.correct for _, _, s in kept]),
        metrics=metrics,
        reward_parts=torch.cat([s.parts for _, _, s in kept]),
        reward_weights=kept[0][2].weights,
    )


def _sample_metrics(batch: RolloutBatch, scores: Scores) -> dict[str, float]:
    """Metrics over every completion sampled in one round (before any filtering)."""
    lengths = batch.lengths.float().cpu()
    rewards = scores.rewards
    return {
        **scores.metrics,
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "rollout/length_mean": lengths.mean().item(),
        "rollout/length_max": lengths.max().item(),
        "rollout/truncated_frac": batch.truncated.float().mean().item(),
    }
