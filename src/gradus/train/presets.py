"""Trainer-level algorithm presets: what each algorithm does around its loss.

The loss knobs live in gradus.objectives.PRESETS. Here: KL coefficient (and where it goes), how
advantages are computed, and DAPO's data operations. Papers' defaults (../shared/seed/NOTES.md):
GRPO uses a KL term in the loss (beta = 0.04); DAPO, GSPO and SAPO drop it; PPO puts a per-token
KL penalty in the reward and learns a critic; DAPO turns on dynamic sampling and soft overlong
punishment; Dr. GRPO does not divide advantages by the group std.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from gradus.config import AlgoConfig, ConfigError, TrainConfig
from gradus.objectives import PolicyObjective, resolve_objective, valid_knobs


@dataclass(frozen=True)
class AlgoDefaults:
    kl_coef: float
    adv_scale: str | None  # None: GAE from a critic
    dynamic_sampling: bool
    overlong_shaping: bool
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per pass
    kl_estimator: str = "k3"  # GRPO's unbiased, non-negative k3 in the loss


ALGO_DEFAULTS: dict[str, AlgoDefaults] = {
    # NOTES: PPO makes "several epochs over each rollout batch"; two, over one minibatch (the first
    # epoch's own log-probs are the old ones, so no extra forward pass). Its per-token reward is
    # -beta * (log pi - log pi_ref): the k1 estimator.
    "ppo": AlgoDefaults(kl_coef=0.02, adv_scale=None, dynamic_sampling=False, overlong_shaping=False, epochs=2,
                        kl_estimator="k1"),
    "grpo": AlgoDefaults(kl_coef=0.04, adv_scale="group", dynamic_sampling=False, overlong_shaping=False),
    "dapo": AlgoDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=True, overlong_shaping=True),
    "gspo": AlgoDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=False, overlong_shaping=False),
    "gspo_token": AlgoDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=False, overlong_shaping=False),
    "sapo": AlgoDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=False, overlong_shaping=False),
    "dr_grpo": AlgoDefaults(kl_coef=0.0, adv_scale="none", dynamic_sampling=False, overlong_shaping=False),
    "cispo": AlgoDefaults(kl_coef=0.0, adv_scale="group", dynamic_sampling=False, overlong_shaping=False),
}

LOSS_KNOBS = ("clip_low", "clip_high", "dual_clip", "tau_pos", "tau_neg", "agg", "agg_norm")
PPO_ONLY = ("gamma", "lam", "value_clip", "critic_lr", "critic_warmup")


@dataclass(frozen=True)
class ResolvedAlgo:
    """Everything the trainer needs to know about the algorithm, resolved and checked."""

    name: str
    objective: PolicyObjective
    kl_coef: float
    kl_estimator: str
    kl_in_reward: bool  # PPO: per-token penalty in the reward; others: a term in the loss
    adv_scale: str | None  # None: GAE from a critic
    dynamic_sampling: bool
    max_gen_rounds: int
    overlong_shaping: bool
    overlong_cache: int
    overlong_filter: bool
    epochs: int = 1
    minibatches: int = 1
    monitor_kl: bool = False  # reference log-probs for the KL metric only, when kl_coef is 0

    @property
    def uses_critic(self) -> bool:
        return self.adv_scale is None

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef != 0.0 or self.monitor_kl


def resolve_algo(cfg: TrainConfig) -> ResolvedAlgo:
    """Apply the preset to `cfg.algo`, rejecting knobs that make no sense for the algorithm."""
    a = cfg.algo
    if a.name not in ALGO_DEFAULTS:
        raise ConfigError(f"algo.name: unknown algo {a.name!r}; valid: {', '.join(ALGO_DEFAULTS)}")
    d = ALGO_DEFAULTS[a.name]
    defaults = AlgoConfig()
    is_ppo = d.adv_scale is None

    set_knobs = {k: getattr(a, k) for k in LOSS_KNOBS if getattr(a, k) is not None}
    bad = sorted(set(set_knobs) - set(valid_knobs(a.name)))
    if bad:
        raise ConfigError(
            f"algo.{bad[0]} is not used by algo {a.name!r} (its loss knobs: {', '.join(valid_knobs(a.name))})"
        )
    if not is_ppo:
        changed = [k for k in PPO_ONLY if getattr(a, k) != getattr(defaults, k)]
        if changed:
            raise ConfigError(f"algo.{changed[0]} is only used by ppo (it trains a critic), not by {a.name!r}")
    if is_ppo and a.adv_scale is not None:
        raise ConfigError("algo.adv_scale is not used by ppo: its advantages come from GAE with a critic")
    if a.name == "dr_grpo" and set_knobs.get("agg", "seq-mean-token-sum-norm") == "seq-mean-token-sum-norm":
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
    # ranges (kl_coef >= 0, the estimator's name, ...) are checked on these resolved values by
    # gradus.config_checks.validate, with the rules declared next to each field
    return ResolvedAlgo(
        name=a.name,
        objective=objective,
        kl_coef=d.kl_coef if a.kl_coef is None else a.kl_coef,
        kl_estimator=d.kl_estimator if a.kl_estimator is None else a.kl_estimator,
        kl_in_reward=is_ppo,
        adv_scale=d.adv_scale if a.adv_scale is None else a.adv_scale,
        dynamic_sampling=dynamic,
        max_gen_rounds=a.max_gen_rounds,
        overlong_shaping=overlong,
        overlong_cache=a.overlong_cache,
        overlong_filter=a.overlong_filter,
        epochs=d.epochs if cfg.optim.epochs is None else cfg.optim.epochs,
        minibatches=d.minibatches if cfg.optim.minibatches is None else cfg.optim.minibatches,
        monitor_kl=a.monitor_kl,
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
    out.algo.adv_scale = algo.adv_scale  # None for PPO: GAE from the critic
    out.algo.dynamic_sampling, out.algo.overlong_shaping = algo.dynamic_sampling, algo.overlong_shaping
    out.optim.epochs, out.optim.minibatches = algo.epochs, algo.minibatches
    return out


def preset_values() -> dict[str, dict[str, object]]:
    """For each key whose default is None ("the preset's"): every algorithm's value, for --help-config."""
    base = TrainConfig()
    resolved = {}
    for name in ALGO_DEFAULTS:
        cfg = TrainConfig()
        cfg.algo.name = name
        resolved[name] = resolved_config(cfg)
    out: dict[str, dict[str, object]] = {}
    for section in ("algo", "optim"):
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
