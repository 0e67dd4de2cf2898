"""The registry of algorithms: one entry per algorithm of the ladder, holding its loss preset and
the trainer's defaults around that loss, so adding an algorithm is one entry here.

The loss preset fixes three structural choices (which importance ratio, which trust region, which
aggregation) and the defaults of its knobs, taken from the papers (each cited in gradus.objectives.policy and
docs/objectives.md) and,
for the members adopted after SAPO, from each paper and verl 0.9's recipes (docs/objectives.md):

| algo                  | ratio             | trust region         | default agg             | defaults
| --------------------- | ----------------- | -------------------- | ----------------------- | -------------------------
| ppo                   | token             | clip (+ dual clip)   | token-mean              | eps 0.2
| grpo                  | token             | clip                 | seq-mean-token-mean     | eps 0.2
| dapo                  | token             | clip-higher          | token-mean              | eps 0.2, eps_high 0.28
| gspo                  | sequence s_i      | clip on s_i          | seq-mean-token-mean     | 3e-4, 4e-4
| gspo_token            | sg[s_i]*pi/sg[pi] | clip                 | seq-mean-token-mean     | 3e-4, 4e-4
| sapo                  | token             | soft gate            | seq-mean-token-mean     | tau_pos 1.0, tau_neg 1.05
| dr_grpo               | token             | clip                 | seq-mean-token-sum-norm | eps 0.2, constant norm
| cispo                 | token             | sg[clip(r)] A log pi | token-mean              | no lower bound, r <= 5
| gmpo                  | geometric mean    | clip in log space    | seq-mean-token-mean     | eps 0.4, 0.4
| dppo_tv               | token             | binary TV mask       | seq-mean-token-sum-norm | delta 0.15, 0.15, no cap
| dppo_kl               | token             | binary KL mask       | seq-mean-token-sum-norm | delta 0.05, 0.05, no cap
| clip_cov              | token             | clip + cov detach    | token-mean              | eps 1, 1; 2e-4 in (1, 5)
| kl_cov                | token             | cov KL penalty       | token-mean              | top 2e-3, beta 1
| gdpo                  | token             | clip                 | seq-mean-token-mean     | eps 0.2
| rloo                  | token             | clip                 | token-mean              | eps 0.2
| reinforce_pp          | token             | clip                 | token-mean              | eps 0.2
| reinforce_pp_baseline | token             | clip                 | token-mean              | eps 0.2
| grpo_passk            | token             | clip                 | seq-mean-token-mean     | eps 0.2

The trainer's defaults (applied to a config by gradus.algorithm): the KL coefficient and
estimator (GRPO keeps a k3 term in the loss; PPO, RLOO and REINFORCE++ put a k1 penalty in the
reward, PPO learns a critic; the later papers drop the KL), the advantage estimator and how it
scales (`group` divides by the group's std, `none` only centres it, Dr. GRPO's point; the others
are gradus.objectives.estimators'), DAPO's data operations, how many optimizer passes each rollout
batch gets (epochs x minibatches) and the run's steps (kl: the coefficient and the estimator):

| algo                  | kl       | advantages            | epochs x mbs | data operations                    | steps
| --------------------- | -------- | --------------------- | ------------ | ---------------------------------- | -----
| ppo                   | 0.02 k1  | GAE from a critic     | 2 x 1        | -                                  | 1000
| grpo                  | 0.04 k3  | group                 | 1 x 1        | -                                  | 1500
| dapo                  | 0 k3     | group                 | 1 x 1        | dynamic sampling, overlong shaping | 1000
| gspo                  | 0 k3     | group                 | 1 x 1        | -                                  | 1500
| gspo_token            | 0 k3     | group                 | 1 x 1        | -                                  | 1500
| sapo                  | 0 k3     | group                 | 1 x 1        | -                                  | 1500
| dr_grpo               | 0 k3     | none                  | 1 x 1        | -                                  | 1500
| cispo                 | 0 k3     | group                 | 1 x 1        | -                                  | 1500
| gmpo                  | 0 k3     | group                 | 1 x 1        | -                                  | 1500
| dppo_tv               | 0 k3     | none                  | 1 x 1        | -                                  | 1500
| dppo_kl               | 0 k3     | none                  | 1 x 1        | -                                  | 1500
| clip_cov              | 0 k3     | group                 | 1 x 1        | dynamic sampling                   | 1000
| kl_cov                | 0 k3     | group                 | 1 x 1        | dynamic sampling                   | 1000
| gdpo                  | 0.04 k3  | gdpo, group           | 1 x 1        | -                                  | 1500
| rloo                  | 0.05 k1  | rloo                  | 1 x 1        | -                                  | 1500
| reinforce_pp          | 0.001 k1 | reinforce_pp          | 1 x 1        | -                                  | 1500
| reinforce_pp_baseline | 0.001 k1 | reinforce_pp_baseline | 1 x 1        | -                                  | 1500
| grpo_passk            | 0.04 k3  | grpo_passk, group     | 1 x 1        | -                                  | 1500

(advantages: the estimator and, for those with a scale, `algo.adv_scale`; `group` alone is GRPO's
estimator with the group's std, `none` the same estimator only centred.)

Where the new members' defaults come from: GMPO's clip range (e^-0.4, e^0.4) is its paper's; DPPO's
deltas, Dr. GRPO's advantages and aggregation and no KL are the paper's recipe (verl's
examples/dppo_trainer); Clip-Cov and KL-Cov run on DAPO's recipe in their paper (dynamic sampling,
token-mean, no KL, PPO's clip widened to [0, 2] for Clip-Cov and none for KL-Cov); GDPO and pass@k
change only GRPO's advantages, so they keep GRPO's loss and KL; RLOO's KL coefficient is TRL's
(beta 0.05), REINFORCE++'s verl's (algorithm.kl_ctrl.kl_coef 0.001), both with the KL in the reward
as their papers do. One update per batch, as for the other group algorithms here: the trust
regions act only from the second minibatch of a batch on (optim.minibatches, docs/compare.md).

Steps (`run.steps` when the config leaves it unset) are not from the papers but measured on the default
task (docs/training.md, "The default run"): a group whose completions are all right or all wrong has zero
advantage and teaches nothing. DAPO's dynamic sampling fills each batch with groups that differ (it
dropped 72% of the groups it sampled); the group-advantage algorithms without it train on under a third
as many such groups per step, and need more steps to gain 15 points (1500 against DAPO's 1000). PPO's
advantages come from a critic, so every group carries a signal. The new members take the same rule
(1000 with dynamic sampling, 1500 without); REINFORCE++ whitens over the batch instead of the group,
so an all-equal group is not silent there, but its signal is the batch's spread, not the group's.

Only the knobs that mean something for a preset are accepted for it: an override of any other
knob is an error, never silently ignored. This module is data and maths only: it knows nothing of
the config or the trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gradus.objectives.aggregation import check_agg_mode
from gradus.objectives.estimators import estimator


@dataclass(frozen=True)
class PolicyObjective:
    """A resolved policy objective: the preset's structure plus every knob's value."""

    algo: str
    ratio: str  # "token" | "sequence" | "sequence_token" | "geometric"
    trust: str  # "clip" | "gate" | "cispo" | "tv" | "binary_kl" | "clip_cov" | "kl_cov"
    agg: str
    agg_norm: float | None = None
    clip_low: float | None = None  # None: no lower bound (CISPO); DPPO: the divergence bound delta
    clip_high: float | None = None
    dual_clip: float | None = None
    tau_pos: float | None = None
    tau_neg: float | None = None
    ratio_cap: float | None = None  # DPPO: cap C on the detached importance weight; None: no cap
    cov_frac: float | None = None  # Clip-Cov, KL-Cov: share of the tokens they act on
    cov_low: float | None = None  # Clip-Cov: the covariance band (cov_low, cov_high) of its candidates
    cov_high: float | None = None
    cov_coef: float | None = None  # KL-Cov: beta of its |log r| penalty

    def knobs(self) -> dict[str, float | str | None]:
        """The knob values this objective uses, by name."""
        return {k: getattr(self, k) for k in KNOBS_BY_TRUST[self.trust] if self._uses(k)}

    def _uses(self, knob: str) -> bool:
        return knob != "dual_clip" or self.ratio == "token"



# Which knobs each trust region reads. `agg` and `agg_norm` apply to all.
KNOBS_BY_TRUST: dict[str, tuple[str, ...]] = {
    "clip": ("clip_low", "clip_high", "dual_clip", "agg", "agg_norm"),
    "gate": ("tau_pos", "tau_neg", "agg", "agg_norm"),
    "cispo": ("clip_low", "clip_high", "agg", "agg_norm"),
    "tv": ("clip_low", "clip_high", "ratio_cap", "agg", "agg_norm"),
    "binary_kl": ("clip_low", "clip_high", "ratio_cap", "agg", "agg_norm"),
    "clip_cov": ("clip_low", "clip_high", "cov_frac", "cov_low", "cov_high", "agg", "agg_norm"),
    "kl_cov": ("cov_frac", "cov_coef", "agg", "agg_norm"),
}

@dataclass(frozen=True)
class TrainerDefaults:
    """What an algorithm does around its loss, as its paper sets it (a config may override each)."""

    kl_coef: float  # 0: no reference model is loaded
    adv_scale: str | None  # group's scale, one of ADV_SCALES; None: an estimator that has no scale (GAE)
    advantage: str = "group"  # the advantage estimator, a key of gradus.objectives.estimators.ESTIMATORS
    kl_estimator: str = "k3"  # GRPO's unbiased, non-negative k3 in the loss
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more
    overlong_shaping: bool = False  # DAPO: soft punishment of completions near the length limit
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per pass
    steps: int = 1000  # RL steps of a run (measured on the default task, not from the paper)


@dataclass(frozen=True)
class Algorithm:
    """One registry entry: an algorithm's loss preset and its trainer defaults."""

    objective: PolicyObjective
    trainer: TrainerDefaults

    @property
    def name(self) -> str:
        return self.objective.algo

    @property
    def uses_critic(self) -> bool:
        return estimator(self.trainer.advantage).uses_critic


# Steps of the group-advantage algorithms without dynamic sampling (see the module docstring).
STEPS_WITHOUT_DYNAMIC_SAMPLING = 1500


def _registry(*algos: Algorithm) -> dict[str, Algorithm]:
    return {a.name: a for a in algos}


ALGORITHMS: dict[str, Algorithm] = _registry(
    # NOTES: PPO makes "several epochs over each rollout batch"; two, over one minibatch (the first
    # epoch's own log-probs are the old ones for the second). Its per-token reward is
    # -beta * (log pi - log pi_ref): the k1 estimator.
    Algorithm(PolicyObjective("ppo", "token", "clip", "token-mean", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.02, adv_scale=None, advantage="gae", kl_estimator="k1", epochs=2)),
    Algorithm(PolicyObjective("grpo", "token", "clip", "seq-mean-token-mean", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.04, adv_scale="group", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    Algorithm(PolicyObjective("dapo", "token", "clip", "token-mean", clip_low=0.2, clip_high=0.28),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=True, overlong_shaping=True)),
    Algorithm(PolicyObjective("gspo", "sequence", "clip", "seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    Algorithm(PolicyObjective("gspo_token", "sequence_token", "clip", "seq-mean-token-mean", clip_low=3e-4,
                              clip_high=4e-4),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    Algorithm(PolicyObjective("sapo", "token", "gate", "seq-mean-token-mean", tau_pos=1.0, tau_neg=1.05),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    # Dr. GRPO: advantages centred, not divided by the group std; a constant norm (the trainer sets
    # it to rollout.max_new_tokens) instead of each sequence's length.
    Algorithm(PolicyObjective("dr_grpo", "token", "clip", "seq-mean-token-sum-norm", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.0, adv_scale="none", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    # MiniMax-M1 (CISPO): the weight is clipped above only; 1 + 4.0 caps r at 5.
    Algorithm(PolicyObjective("cispo", "token", "cispo", "token-mean", clip_low=None, clip_high=4.0),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    # GMPO: the clip range (e^-0.4, e^0.4) on each token's ratio, in log space.
    Algorithm(PolicyObjective("gmpo", "geometric", "clip", "seq-mean-token-mean", clip_low=0.4, clip_high=0.4),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    # DPPO: the paper's recipe runs Dr. GRPO's advantages and aggregation (norm: rollout.max_new_tokens)
    # without KL; its TIS cap is off there (clip_ratio_c 10000).
    Algorithm(PolicyObjective("dppo_tv", "token", "tv", "seq-mean-token-sum-norm", clip_low=0.15, clip_high=0.15),
              TrainerDefaults(kl_coef=0.0, adv_scale="none", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    Algorithm(PolicyObjective("dppo_kl", "token", "binary_kl", "seq-mean-token-sum-norm", clip_low=0.05,
                              clip_high=0.05),
              TrainerDefaults(kl_coef=0.0, adv_scale="none", steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    # Clip-Cov and KL-Cov run on DAPO's recipe in their paper: dynamic sampling, token-mean, no KL.
    Algorithm(PolicyObjective("clip_cov", "token", "clip_cov", "token-mean", clip_low=1.0, clip_high=1.0,
                              cov_frac=2e-4, cov_low=1.0, cov_high=5.0),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=True)),
    Algorithm(PolicyObjective("kl_cov", "token", "kl_cov", "token-mean", cov_frac=2e-3, cov_coef=1.0),
              TrainerDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=True)),
    # GDPO and pass@k change GRPO's advantages only.
    Algorithm(PolicyObjective("gdpo", "token", "clip", "seq-mean-token-mean", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.04, adv_scale="group", advantage="gdpo",
                              steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    # RLOO and REINFORCE++: the KL (k1) in the reward, as in their papers; verl's loss aggregation.
    Algorithm(PolicyObjective("rloo", "token", "clip", "token-mean", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.05, adv_scale=None, advantage="rloo", kl_estimator="k1",
                              steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    Algorithm(PolicyObjective("reinforce_pp", "token", "clip", "token-mean", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.001, adv_scale=None, advantage="reinforce_pp", kl_estimator="k1",
                              steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    Algorithm(PolicyObjective("reinforce_pp_baseline", "token", "clip", "token-mean", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.001, adv_scale=None, advantage="reinforce_pp_baseline", kl_estimator="k1",
                              steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
    Algorithm(PolicyObjective("grpo_passk", "token", "clip", "seq-mean-token-mean", clip_low=0.2, clip_high=0.2),
              TrainerDefaults(kl_coef=0.04, adv_scale="group", advantage="grpo_passk",
                              steps=STEPS_WITHOUT_DYNAMIC_SAMPLING)),
)

# The loss presets alone, by name: a view of ALGORITHMS, never a second table.
PRESETS: dict[str, PolicyObjective] = {name: a.objective for name, a in ALGORITHMS.items()}


def valid_knobs(algo: str) -> tuple[str, ...]:
    """The knob names that may be overridden for `algo`."""
    preset = _preset(algo)
    return tuple(k for k in KNOBS_BY_TRUST[preset.trust] if preset._uses(k))


def resolve_objective(algo: str, **overrides: float | str | None) -> PolicyObjective:
    """The preset for `algo` with `overrides` applied and checked.

    Raises ValueError for an unknown algo, a knob the algo does not use, or an out-of-range value.
    """
    preset = _preset(algo)
    allowed = valid_knobs(algo)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"knob(s) {', '.join(unknown)} not used by algo {algo!r}; valid knobs: {', '.join(allowed)}"
        )
    obj = dataclasses.replace(preset, **overrides)
    _validate(obj)
    return obj


def _preset(algo: str) -> PolicyObjective:
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; valid algos: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[algo].objective


def _validate(obj: PolicyObjective) -> None:
    check_agg_mode(obj.agg)
    if obj.agg_norm is not None and obj.agg != "seq-mean-token-sum-norm":
        raise ValueError(f"agg_norm is only used with agg='seq-mean-token-sum-norm', not {obj.agg!r}")
    if obj.agg_norm is not None and obj.agg_norm <= 0:
        raise ValueError(f"agg_norm must be positive, got {obj.agg_norm}")
    if obj.trust in ("clip", "cispo", "tv", "binary_kl", "clip_cov"):
        if obj.clip_high is None or not obj.clip_high > 0:
            raise ValueError(f"clip_high must be positive, got {obj.clip_high}")
        if obj.clip_low is not None and not 0 < obj.clip_low <= 1:
            raise ValueError(f"clip_low must be in (0, 1], got {obj.clip_low}")
        if obj.trust != "cispo" and obj.clip_low is None:
            raise ValueError(f"clip_low is required for {obj.algo}'s trust region")
    if obj.ratio_cap is not None and not obj.ratio_cap >= 1:
        raise ValueError(f"ratio_cap must be >= 1 (a cap below 1 would shrink every on-policy token), "
                         f"got {obj.ratio_cap}")
    if obj.trust in ("clip_cov", "kl_cov"):
        if obj.cov_frac is None or not 0 < obj.cov_frac <= 1:
            raise ValueError(f"cov_frac must be in (0, 1] (a share of the tokens), got {obj.cov_frac}")
    if obj.trust == "clip_cov" and not (obj.cov_low is not None and obj.cov_high is not None
                                        and obj.cov_low < obj.cov_high):
        raise ValueError(f"cov_low ({obj.cov_low}) must be below cov_high ({obj.cov_high})")
    if obj.trust == "kl_cov" and (obj.cov_coef is None or not obj.cov_coef > 0):
        raise ValueError(f"cov_coef must be positive, got {obj.cov_coef}")
    if obj.dual_clip is not None and obj.dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (the loss is bounded at dual_clip * |A|), got {obj.dual_clip}")
    if obj.trust == "gate":
        for name in ("tau_pos", "tau_neg"):
            value = getattr(obj, name)
            if value is None or value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
