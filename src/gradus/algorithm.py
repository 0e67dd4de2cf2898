"""A config resolved against the algorithm registry (gradus.objectives.ALGORITHMS).

Each registry entry holds an algorithm's loss preset and its trainer defaults (KL coefficient and
where it goes, how advantages are computed, DAPO's data operations, epochs, minibatches and steps); this
module only applies it to a `TrainConfig`: a value the config leaves at None is the entry's, a value
the config sets is checked against what the algorithm uses. Adding an algorithm is one entry there.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from gradus.config import AlgoConfig, ConfigError, TrainConfig
from gradus.objectives import (
    ALGORITHMS,
    ESTIMATORS,
    KNOBS_BY_TRUST,
    Estimator,
    PolicyObjective,
    Rejection,
    estimator,
    resolve_bounds,
    resolve_objective,
    resolve_rejection,
    valid_knobs,
)

# The loss knobs, as named in both the objective and the config's algo section.
LOSS_KNOBS = tuple(dict.fromkeys(k for knobs in KNOBS_BY_TRUST.values() for k in knobs))
ESTIMATOR_KNOBS = ("gamma", "lam")  # advantage settings that only some estimators read (Estimator.knobs)
CRITIC_ONLY = ("value_clip", "critic_lr", "critic_warmup")


@dataclass(frozen=True)
class ResolvedAlgo:
    """Everything the trainer needs to know about the algorithm, resolved and checked."""

    name: str
    objective: PolicyObjective
    kl_coef: float
    kl_estimator: str
    kl_in_reward: bool  # the estimator's: a per-token penalty in the reward (PPO's GAE); else a term in the loss
    adv_scale: str | None  # the group estimator's scale; None for an estimator without one (GAE)
    dynamic_sampling: bool
    max_gen_rounds: int
    overlong_shaping: bool
    overlong_cache: int
    overlong_filter: bool
    epochs: int = 1
    minibatches: int = 1
    steps: int = 1000  # RL steps of the run
    monitor_kl: bool = False  # reference log-probs for the KL metric only, when kl_coef is 0
    correction: str = "none"  # rollout/training mismatch correction (gradus.objectives.correction)
    correction_bounds: tuple[float | None, float | None] = (None, None)  # its (low, high), defaults filled in
    advantage: str = "group"  # the advantage estimator (gradus.objectives.estimators)
    rejection: tuple[Rejection, ...] = ()  # rollout/training rejection criteria (gradus.objectives.correction)

    @property
    def estimator(self) -> Estimator:
        return estimator(self.advantage)

    @property
    def uses_critic(self) -> bool:
        return self.estimator.uses_critic

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef != 0.0 or self.monitor_kl


def resolve_algo(cfg: TrainConfig) -> ResolvedAlgo:
    """Apply the preset to `cfg.algo`, rejecting knobs that make no sense for the algorithm."""
    a = cfg.algo
    if a.name not in ALGORITHMS:
        raise ConfigError(f"algo.name: unknown algo {a.name!r}; valid: {', '.join(ALGORITHMS)}")
    d = ALGORITHMS[a.name].trainer
    defaults = AlgoConfig()
    advantage = d.advantage if a.advantage is None else a.advantage
    if advantage not in ESTIMATORS:
        raise ConfigError(f"algo.advantage: unknown estimator {advantage!r}; valid: {', '.join(ESTIMATORS)}")
    est = estimator(advantage)
    is_ppo = est.uses_critic

    set_knobs = {k: getattr(a, k) for k in LOSS_KNOBS if getattr(a, k) is not None}
    bad = sorted(set(set_knobs) - set(valid_knobs(a.name)))
    if bad:
        raise ConfigError(
            f"algo.{bad[0]} is not used by algo {a.name!r} (its loss knobs: {', '.join(valid_knobs(a.name))})"
        )
    for knob in ESTIMATOR_KNOBS:
        if knob not in est.knobs and getattr(a, knob) != getattr(defaults, knob):
            readers = ", ".join(name for name, e in ESTIMATORS.items() if knob in e.knobs)
            raise ConfigError(f"algo.{knob} is not used by the {advantage} advantage estimator"
                              + (f" ({a.name}'s)" if a.advantage is None else "")
                              + f"; the estimators that read it: {readers} (algo.advantage)")
    if not is_ppo:
        changed = [k for k in CRITIC_ONLY if getattr(a, k) != getattr(defaults, k)]
        if changed:
            raise ConfigError(f"algo.{changed[0]} is only used with a critic (algo.advantage=gae, as ppo), not by "
                              f"{a.name!r} with the {advantage} estimator")
    if "adv_scale" not in est.knobs and a.adv_scale is not None:
        raise ConfigError(f"algo.adv_scale is not used by the {advantage} advantage estimator"
                          + (f" ({a.name}'s)" if a.advantage is None else "")
                          + (": its advantages come from GAE with a critic" if est.uses_critic else ""))
    # a constant norm (Dr. GRPO's point): the generation budget, not the padded length of each micro-batch
    if set_knobs.get("agg", ALGORITHMS[a.name].objective.agg) == "seq-mean-token-sum-norm":
        set_knobs.setdefault("agg_norm", float(cfg.rollout.max_new_tokens))
    try:
        objective = resolve_objective(a.name, **set_knobs)
    except ValueError as err:
        raise ConfigError(f"algo: {err}") from err

    dynamic = d.dynamic_sampling if a.dynamic_sampling is None else a.dynamic_sampling
    overlong = d.overlong_shaping if a.overlong_shaping is None else a.overlong_shaping
    if not dynamic and a.max_gen_rounds != defaults.max_gen_rounds:
        raise ConfigError("algo.max_gen_rounds only applies with algo.dynamic_sampling=true")
    if not overlong and a.overlong_cache != defaults.overlong_cache:
        raise ConfigError("algo.overlong_cache only applies with algo.overlong_shaping=true")
    epochs = d.epochs if cfg.optim.epochs is None else cfg.optim.epochs
    minibatches = d.minibatches if cfg.optim.minibatches is None else cfg.optim.minibatches
    try:
        bounds = resolve_bounds(a.rollout_correction, a.correction_low, a.correction_high)
    except ValueError as err:  # e.g. a lower bound for tis, which only caps
        raise ConfigError(f"algo.rollout_correction={a.rollout_correction}: {err} (algo.correction_low / "
                          "algo.correction_high)") from err
    try:
        rejection = resolve_rejection(a.rollout_rejection, a.rejection_thresholds)
    except ValueError as err:
        raise ConfigError(f"algo.rollout_rejection={a.rollout_rejection}: {err} (algo.rejection_thresholds)") from err
    # ranges (kl_coef >= 0, the estimator's name, ...) are checked on these resolved values by
    # gradus.config_checks.validate, with the rules declared next to each field
    return ResolvedAlgo(
        name=a.name,
        objective=objective,
        kl_coef=d.kl_coef if a.kl_coef is None else a.kl_coef,
        kl_estimator=d.kl_estimator if a.kl_estimator is None else a.kl_estimator,
        kl_in_reward=est.kl_in_reward,
        adv_scale=None if "adv_scale" not in est.knobs else (
            a.adv_scale if a.adv_scale is not None else d.adv_scale or "group"),
        dynamic_sampling=dynamic,
        max_gen_rounds=a.max_gen_rounds,
        overlong_shaping=overlong,
        overlong_cache=a.overlong_cache,
        overlong_filter=a.overlong_filter,
        epochs=epochs,
        minibatches=minibatches,
        steps=d.steps if cfg.run.steps is None else cfg.run.steps,
        monitor_kl=a.monitor_kl,
        correction=a.rollout_correction,
        correction_bounds=bounds,
        advantage=advantage,
        rejection=rejection,
    )


def resolved_config(cfg: TrainConfig, algo: ResolvedAlgo | None = None) -> TrainConfig:
    """A copy of `cfg` with every "None: the preset's" value filled in with what the run uses.

    This is what a run saves as config.yaml: it reads as the run was, and resolves to the same
    algorithm again (the filled-in knobs are the preset's own, so they are all valid for it).
    """
    algo = resolve_algo(cfg) if algo is None else algo
    out = copy.deepcopy(cfg)
    for knob, value in algo.objective.knobs().items():
        setattr(out.algo, knob, value)
    out.algo.kl_coef, out.algo.kl_estimator = algo.kl_coef, algo.kl_estimator
    out.algo.advantage = algo.advantage
    out.algo.adv_scale = algo.adv_scale  # None for an estimator without a scale (PPO's GAE)
    out.algo.dynamic_sampling, out.algo.overlong_shaping = algo.dynamic_sampling, algo.overlong_shaping
    out.optim.epochs, out.optim.minibatches = algo.epochs, algo.minibatches
    out.run.steps = algo.steps
    # the correction's bounds and the rejection thresholds stay as given (None: the defaults), so that a
    # resume may change the mode
    return out


def preset_values() -> dict[str, dict[str, object]]:
    """For each key whose default is None ("the preset's"): every algorithm's value, for --help-config."""
    base = TrainConfig()
    resolved = {}
    for name in ALGORITHMS:
        cfg = TrainConfig()
        cfg.algo.name = name
        resolved[name] = resolved_config(cfg)
    out: dict[str, dict[str, object]] = {}
    for section in ("algo", "optim", "run"):
        for f in dataclasses.fields(getattr(base, section)):
            values = {name: getattr(getattr(r, section), f.name) for name, r in resolved.items()}
            if getattr(getattr(base, section), f.name) is None and any(v is not None for v in values.values()):
                out[f"{section}.{f.name}"] = values
    return out


def describe(algo: ResolvedAlgo) -> dict[str, object]:
    """A flat dict of the resolved settings, for `gradus algos` and run summaries."""
    out: dict[str, object] = {"ratio": algo.objective.ratio, "trust region": algo.objective.trust}
    out.update(algo.objective.knobs())
    out.update({k: v for k, v in dataclasses.asdict(algo).items() if k not in ("name", "objective")})
    out["critic"] = algo.uses_critic
    return out
