"""The registry of advantage estimators: name -> how a rollout batch's rewards become advantages.

An estimator reads `AdvantageInputs` (the outcome rewards of the batch's rows, laid out group by group, and
whatever else it declares it needs: a critic's values, the per-token KL to the reference) and returns
`Advantages`. The trainer looks the algorithm's estimator up here and never branches on the algorithm:

| name    | advantages                                              | needs              | KL to the reference      |
| ------- | ------------------------------------------------------- | ------------------ | ------------------------ |
| `group` | (r_i - mean(group)) / scale, one per completion         | groups of G >= 2   | a term of the loss       |
| `gae`   | GAE over per-token rewards, whitened over the batch     | a critic's values  | a per-token reward (k1)  |

`group`'s scale (`algo.adv_scale`): the group's std (GRPO), the batch's std, or none (Dr. GRPO). `gae` adds
the penalty -kl_coef * KL_t to every token's reward and the outcome to the last one (PPO's shaping; see
`outcome_token_rewards`), then runs `gae` with gamma and lam. The formulas and their papers are in
`gradus.objectives.advantages`; adding an estimator is one pure function there and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradus.objectives.advantages import Total, gae, group_advantages, outcome_token_rewards


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read for the N rows of one rollout batch (G consecutive rows per prompt)."""

    rewards: torch.Tensor  # [N] outcome reward of each completion (weighted sum of the rewards)
    loss_mask: torch.Tensor  # [N, T] 1 = the token counts in the loss
    group_size: int
    values: torch.Tensor | None = None  # [N, T] the critic's V before each token (estimators with a critic)
    kl: torch.Tensor | None = None  # [N, T] per-token KL to the reference (estimators with kl_in_reward)
    reward_parts: torch.Tensor | None = None  # [N, K] each configured reward's own score, before its weight
    reward_weights: tuple[float, ...] | None = None  # [K] the weights of task.rewards (rewards = parts @ weights)
    total: Total | None = None  # sums a tensor over data-parallel shards (batch statistics of the whole batch)


@dataclass(frozen=True)
class AdvantageSettings:
    """The knobs of the estimators (each reads its own; `Estimator.knobs` names them)."""

    adv_scale: str = "group"  # group: one of gradus.objectives.advantages.ADV_SCALES
    gamma: float = 1.0  # gae
    lam: float = 0.95  # gae
    kl_coef: float = 0.0  # estimators with kl_in_reward: weight of the per-token KL penalty


@dataclass(frozen=True)
class Advantages:
    advantages: torch.Tensor  # [N] per completion, or [N, T] per token
    returns: torch.Tensor | None = None  # [N, T] the critic's regression targets (estimators with a critic)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimator:
    """One registry entry."""

    name: str
    fn: Callable[[AdvantageInputs, AdvantageSettings], Advantages]
    uses_critic: bool = False  # the trainer builds, trains and queries a critic
    kl_in_reward: bool = False  # the KL to the reference is a per-token reward, not a term of the loss
    min_group_size: int = 1  # rollout.group_size must be at least this
    knobs: tuple[str, ...] = ()  # the AdvantageSettings fields it reads (others are refused in a config)


def _group(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    adv = group_advantages(inputs.rewards, inputs.group_size, scale=s.adv_scale, total=inputs.total)  # [N]
    return Advantages(adv, metrics={"adv/abs_mean": adv.abs().mean().item()})


def _gae(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    if inputs.values is None:
        raise ValueError("the gae estimator needs the critic's values")
    token_rewards = outcome_token_rewards(inputs.rewards, inputs.loss_mask, inputs.kl, s.kl_coef)  # [N, T]
    adv, returns = gae(token_rewards, inputs.values, inputs.loss_mask, gamma=s.gamma, lam=s.lam,
                       total=inputs.total)  # whitened over the batch of every rank
    return Advantages(adv, returns)


def _registry(*entries: Estimator) -> dict[str, Estimator]:
    return {e.name: e for e in entries}


ESTIMATORS: dict[str, Estimator] = _registry(
    Estimator("group", _group, min_group_size=2, knobs=("adv_scale",)),
    Estimator("gae", _gae, uses_critic=True, kl_in_reward=True, knobs=("gamma", "lam")),
)


def estimator(name: str) -> Estimator:
    """The registry entry `name`; ValueError listing the valid names."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimate(name: str, inputs: AdvantageInputs, settings: AdvantageSettings) -> Advantages:
    """Advantages of the batch by estimator `name`."""
    return estimator(name).fn(inputs, settings)
