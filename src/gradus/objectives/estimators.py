"""The registry of advantage estimators: name -> how a rollout batch's rewards become advantages.

An estimator reads `AdvantageInputs` (the outcome rewards of the batch's rows, laid out group by group, and
whatever else it declares it needs: a critic's values, the per-token KL to the reference) and returns
`Advantages`. The trainer looks the algorithm's estimator up here and never branches on the algorithm:

| name                    | advantages                                           | needs         | KL to the reference
| ----------------------- | ---------------------------------------------------- | ------------- | -------------------
| `group`                 | (r_i - mean(group)) / scale                          | G >= 2        | in the loss
| `gae`                   | GAE over per-token rewards, batch-whitened           | a critic      | per-token reward
| `rloo`                  | R_i - mean of the others in its group                | G >= 2        | in R_i
| `reinforce_pp`          | per-token returns, batch-whitened                    | -             | per-token reward
| `reinforce_pp_baseline` | R_i - mean(group) on every token, batch-whitened     | G >= 2        | in R_i
| `grpo_passk`            | (r_max - r_second) / scale on a group's best, else 0 | G >= 2        | in the loss
| `gdpo`                  | each reward group-normalised, sum batch-whitened     | G >= 2, parts | in the loss

(parts: AdvantageInputs.reward_parts, each reward's own score.) `group`'s scale (`algo.adv_scale`, also read
by `grpo_passk` and `gdpo`): the group's std (GRPO), the batch's std, or none (Dr. GRPO). `gae` and
`reinforce_pp` add the penalty -kl_coef * KL_t to every token's reward and the outcome to the last one (PPO's
shaping; see `outcome_token_rewards`), then run `gae` with gamma and lam (`reinforce_pp`: lam = 1 and no
critic, V = 0). `rloo` and `reinforce_pp_baseline` put the same penalty, summed over the completion, in its
reward R_i = r_i - kl_coef sum_t KL_t (`sequence_rewards`). The KL_t is the algorithm's kl_estimator of pi_old
against pi_ref. The formulas and their papers are in `gradus.objectives.advantages`; adding an estimator is
one pure function there and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradus.objectives.advantages import (
    Total,
    gae,
    gdpo_advantages,
    group_advantages,
    outcome_token_rewards,
    passk_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_rewards,
)


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
    turn_rewards: torch.Tensor | None = None  # [N, T] episodes: each turn's reward at its last token (per-token
    # estimators place them there; the others read their sum, which `rewards` holds)


@dataclass(frozen=True)
class AdvantageSettings:
    """The knobs of the estimators (each reads its own; `Estimator.knobs` names them)."""

    adv_scale: str = "group"  # group, grpo_passk, gdpo: one of gradus.objectives.advantages.ADV_SCALES
    gamma: float = 1.0  # gae, reinforce_pp
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
    needs_reward_parts: bool = False  # reads AdvantageInputs.reward_parts and reward_weights


def _group(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    adv = group_advantages(inputs.rewards, inputs.group_size, scale=s.adv_scale, total=inputs.total)  # [N]
    return Advantages(adv, metrics={"adv/abs_mean": adv.abs().mean().item()})


def _gae(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    if inputs.values is None:
        raise ValueError("the gae estimator needs the critic's values")
    token_rewards = outcome_token_rewards(inputs.rewards, inputs.loss_mask, inputs.kl, s.kl_coef,
                                          inputs.turn_rewards)  # [N, T]
    adv, returns = gae(token_rewards, inputs.values, inputs.loss_mask, gamma=s.gamma, lam=s.lam,
                       total=inputs.total)  # whitened over the batch of every rank
    return Advantages(adv, returns)


def _rloo(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    rewards = sequence_rewards(inputs.rewards, inputs.loss_mask, _kl(inputs, s, "rloo"), s.kl_coef)  # [N]
    adv = rloo_advantages(rewards, inputs.group_size)  # [N]
    return Advantages(adv, metrics={"adv/abs_mean": adv.abs().mean().item()})


def _reinforce_pp(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    token_rewards = outcome_token_rewards(inputs.rewards, inputs.loss_mask, _kl(inputs, s, "reinforce_pp"),
                                          s.kl_coef, inputs.turn_rewards)  # [N, T]
    adv = reinforce_pp_advantages(token_rewards, inputs.loss_mask, gamma=s.gamma, total=inputs.total)  # [N, T]
    return Advantages(adv, metrics={"adv/abs_mean": _token_abs_mean(adv, inputs.loss_mask)})


def _reinforce_pp_baseline(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    rewards = sequence_rewards(inputs.rewards, inputs.loss_mask, _kl(inputs, s, "reinforce_pp_baseline"),
                               s.kl_coef)  # [N]
    adv = reinforce_pp_baseline_advantages(rewards, inputs.loss_mask, inputs.group_size, total=inputs.total)  # [N, T]
    return Advantages(adv, metrics={"adv/abs_mean": _token_abs_mean(adv, inputs.loss_mask)})


def _passk(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    adv = passk_advantages(inputs.rewards, inputs.group_size, scale=s.adv_scale, total=inputs.total)  # [N]
    return Advantages(adv, metrics={"adv/abs_mean": adv.abs().mean().item()})


def _gdpo(inputs: AdvantageInputs, s: AdvantageSettings) -> Advantages:
    if inputs.reward_parts is None or inputs.reward_weights is None:
        raise ValueError("the gdpo estimator normalises each reward on its own: it needs AdvantageInputs.reward_parts "
                         "[N, K] and reward_weights [K] (the scores and weights of task.rewards)")
    adv = gdpo_advantages(inputs.reward_parts, inputs.reward_weights, inputs.group_size, scale=s.adv_scale,
                          total=inputs.total)  # [N]
    return Advantages(adv, metrics={"adv/abs_mean": adv.abs().mean().item()})


def _kl(inputs: AdvantageInputs, s: AdvantageSettings, name: str) -> torch.Tensor | None:
    """The per-token KL an estimator puts in the reward; None when kl_coef is 0."""
    if s.kl_coef == 0.0:
        return None
    if inputs.kl is None:
        raise ValueError(f"the {name} estimator puts the KL in the reward (kl_coef={s.kl_coef}): it needs "
                         "AdvantageInputs.kl, the per-token KL to the reference")
    return inputs.kl


def _token_abs_mean(adv: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(adv.dtype)
    return ((adv.abs() * m).sum() / m.sum().clamp(min=1)).item()


def _registry(*entries: Estimator) -> dict[str, Estimator]:
    return {e.name: e for e in entries}


ESTIMATORS: dict[str, Estimator] = _registry(
    Estimator("group", _group, min_group_size=2, knobs=("adv_scale",)),
    Estimator("gae", _gae, uses_critic=True, kl_in_reward=True, knobs=("gamma", "lam")),
    Estimator("rloo", _rloo, kl_in_reward=True, min_group_size=2),
    Estimator("reinforce_pp", _reinforce_pp, kl_in_reward=True, knobs=("gamma",)),
    Estimator("reinforce_pp_baseline", _reinforce_pp_baseline, kl_in_reward=True, min_group_size=2),
    Estimator("grpo_passk", _passk, min_group_size=2, knobs=("adv_scale",)),
    Estimator("gdpo", _gdpo, min_group_size=2, knobs=("adv_scale",), needs_reward_parts=True),
)


def estimator(name: str) -> Estimator:
    """The registry entry `name`; ValueError listing the valid names."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimate(name: str, inputs: AdvantageInputs, settings: AdvantageSettings) -> Advantages:
    """Advantages of the batch by estimator `name`."""
    return estimator(name).fn(inputs, settings)
