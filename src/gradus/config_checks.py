"""The one validation of a run's config, run by every command before any work.

1. Every field against its own valid values (declared next to it in `gradus.config`): ranges,
   finiteness, choices, patterns.
2. The algorithm preset applied (`gradus.algorithm.resolve_algo`: which knobs the algorithm uses), and
   every value the preset filled in checked by the same rules.
3. The rules that tie fields together (minibatches divide the batch, groups of two or more, LoRA
   fields only with a LoRA rank and never on the lm head or the embeddings, ...).
4. What the rollout engine (`rollout.engine`, its class's `check`) and the parallel mode (`run.parallel`)
   cannot run, on this job's number of processes; the batch split evenly over them.
5. MoE settings a dense built-in model (`model.arch`) cannot use, and routing replay r3 with an engine that
   does not record the rollout's routing.
6. The reward list parsed, its weights finite; multi-turn episodes (an environment) without what they cannot
   run with (task.rewards), and a token budget that holds its turns.

What needs the machine, the model's config.json or the task's data (the device exists, prompt +
completion fit the model's and the engine's positions, a held-out set is left, an MoE setting on a
`model.path` that is dense) is checked next, still before any work, by `gradus.train.bootstrap.preflight`.
This module sits below `gradus.train` and imports nothing from it.
"""

from __future__ import annotations

import dataclasses
import math

from gradus.algorithm import ResolvedAlgo, resolve_algo, resolved_config
from gradus.config import ConfigError, TrainConfig, allowed
from gradus.models.lora import check_lora_config
from gradus.parallel.modes import MODES
from gradus.rollout.registry import engine_class


def validate(cfg: TrainConfig, *, rl: bool = True, world: int = 1) -> ResolvedAlgo:
    """Check everything that can be checked before any work; return the resolved algorithm.

    `rl=False` (commands that run no RL step: `gradus sft`, `gradus eval`) skips the rules that tie the
    RL batch to the algorithm (groups, minibatches, DAPO's overlong window), so an algorithm knob
    never stops a command that does not use it. Every field is still checked against its own values.
    `world`: the job's number of processes (torchrun's). Raises ConfigError naming the field, its value
    and what is allowed.
    """
    check_fields(cfg)
    algo = resolve_algo(cfg)
    check_fields(resolved_config(cfg, algo), note=f" (the {algo.name} preset's value)")
    if rl:
        _check_rl_rules(cfg, algo, world)
    _check_task_rules(cfg)
    _check_runtime_rules(cfg, algo, world)
    reward_weights(cfg.task.rewards)
    return algo


def _check_runtime_rules(cfg: TrainConfig, algo: ResolvedAlgo, world: int) -> None:
    """The engine and the parallel mode, each by its own `check`; MoE settings a built-in model can decide."""
    engine = engine_class(cfg.rollout.engine)
    for problem in (engine.check(cfg, world), MODES[cfg.run.parallel].check(cfg, world) if world > 1 else None):
        if problem:
            raise ConfigError(problem)
    replay = cfg.algo.routing_replay
    if replay == "r3" and not engine.records_routing:
        raise ConfigError(f"algo.routing_replay=r3 needs the rollout's routing, which rollout.engine={engine.name} "
                          f"does not record (rollout.engine=local does); with {engine.name} use r2 or none")
    if replay == "r2" and algo.epochs * algo.minibatches == 1:
        raise ConfigError(f"algo.routing_replay=r2 replays the old policy's routing in the later updates of a batch; "
                          f"{algo.name} makes one (optim.epochs=1, optim.minibatches=1), so r2 would change nothing: "
                          "set optim.minibatches or optim.epochs above 1, or use r3")
    if cfg.model.path is None:  # the built-in model's architecture is the config's own
        from gradus.models.tiny import MOE_ARCHS

        moe_problem(cfg, cfg.model.arch, is_moe=cfg.model.arch in MOE_ARCHS, where=f"model.arch={cfg.model.arch}")


def moe_problem(cfg: TrainConfig, model_type: str | None, *, is_moe: bool, where: str) -> None:
    """ConfigError for an MoE setting a model of `model_type` (dense unless `is_moe` and gradus routes it)
    cannot use: routing replay and the router's load-balancing loss need routers gradus knows."""
    from gradus.models.routing import ROUTERS  # transformers' MoE classes: imported only when asked

    routed = is_moe and model_type in ROUTERS
    if algo_replay := cfg.algo.routing_replay if cfg.algo.routing_replay != "none" else None:
        if not routed:
            raise ConfigError(f"algo.routing_replay={algo_replay} needs a mixture-of-experts policy; {where} is "
                              f"dense or not one gradus can route (supported model types: {', '.join(ROUTERS)})")
    coef = cfg.model.router_aux_coef
    if coef is not None and coef > 0 and not is_moe:
        raise ConfigError(f"model.router_aux_coef={coef}: {where} has no router (only mixture-of-experts models)")


def check_fields(cfg: TrainConfig, note: str = "") -> None:
    """Every field's value against the valid values declared with it (`note` ends each message)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            problem = allowed(key).problem(value)
            if problem:
                raise ConfigError(f"{key} {problem}, got {value!r}{note}")


def reward_weights(text: str | None) -> None:
    """task.rewards must parse, with every weight a finite number within the bound rewards themselves
    obey (so no weighted total can overflow); else a ConfigError."""
    if not text:
        return
    from gradus.rewards import parse_reward_specs
    from gradus.rewards.worker import MAX_ABS_SCORE

    specs = parse_reward_specs(text, None)
    for spec in specs:
        if not spec.name_or_path:
            raise ConfigError(f"task.rewards: an entry has no reward name, got {text!r}")
        if not (math.isfinite(spec.weight) and abs(spec.weight) <= MAX_ABS_SCORE):
            raise ConfigError(f"task.rewards: the weight of {spec.name_or_path!r} must be a finite number within "
                              f"+-{MAX_ABS_SCORE:g}, got {spec.weight} (in {text!r})")


def _check_rl_rules(cfg: TrainConfig, algo: ResolvedAlgo, world: int) -> None:
    r = cfg.rollout
    if r.group_size < algo.estimator.min_group_size:
        raise ConfigError(f"rollout.group_size must be >= {algo.estimator.min_group_size} for {algo.name} (its "
                          f"{algo.advantage} advantages need a group), got {r.group_size}")
    if r.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of the {world} "
                          "processes: it is the global batch, split evenly over the ranks")
    rows = r.group_size * r.prompts_per_step
    if rows % algo.minibatches:
        raise ConfigError(f"optim.minibatches ({algo.minibatches}) must divide the batch of "
                          f"rollout.prompts_per_step x rollout.group_size = {rows} completions")
    if algo.overlong_shaping and algo.overlong_cache > r.max_new_tokens:
        raise ConfigError(f"algo.overlong_cache must be in 1..rollout.max_new_tokens ({r.max_new_tokens}), "
                          f"got {algo.overlong_cache}")


def _check_task_rules(cfg: TrainConfig) -> None:
    t = cfg.task
    if t.name == "file" and not t.data_file:
        raise ConfigError("task.data_file is required with task.name=file")
    if t.name != "file" and t.data_file:
        raise ConfigError(f"task.data_file is only used with task.name=file, not {t.name!r}")
    if t.difficulty is not None and t.name != "arithmetic":
        raise ConfigError(f"task.difficulty is only used by the arithmetic task, not {t.name!r}")
    check_lora_config(cfg.model)
    _check_env_rules(cfg)


def _check_env_rules(cfg: TrainConfig) -> None:
    """Multi-turn episodes (an env.name, or a task with an environment of its own): what they cannot run with."""
    from gradus.tasks import task_class

    env = cfg.env.name or getattr(task_class(cfg.task.name), "default_env", None)
    if env is None:
        if cfg.env.options:
            raise ConfigError("env.options is only used with an environment (env.name, or task.name=guess)")
        return
    if cfg.task.rewards:
        raise ConfigError(f"task.rewards: episodes of environment {env!r} are scored by the environment's rewards; "
                          "leave task.rewards unset (or add the reward to the environment's step)")
    if cfg.env.max_tokens < cfg.env.max_turns:
        raise ConfigError(f"env.max_tokens={cfg.env.max_tokens} cannot hold env.max_turns={cfg.env.max_turns} "
                          "turns of one token each; raise env.max_tokens")
