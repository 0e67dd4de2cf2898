"""The one validation of a run's config, run by every command before any work.

1. Every field against its own valid values (declared next to it in `gradus.config`): ranges,
   finiteness, choices, patterns.
2. The algorithm preset applied (`resolve_algo`: which knobs the algorithm uses), and every value
   the preset filled in checked by the same rules.
3. The rules that tie fields together (minibatches divide the batch, groups of two or more, LoRA
   fields only with a LoRA rank and never on the lm head or the embeddings, ...).
4. The reward list parsed, its weights finite.

What needs the machine, the model's config.json or the task's data (the device exists, prompt +
completion fit the model's positions, a held-out set is left) is checked next, still before any work,
by `gradus.train.bootstrap.preflight`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from gradus.config import ConfigError, ModelConfig, TrainConfig, allowed

if TYPE_CHECKING:
    from gradus.train.presets import ResolvedAlgo


def validate(cfg: TrainConfig, *, rl: bool = True) -> ResolvedAlgo:
    """Check everything that can be checked before any work; return the resolved algorithm.

    `rl=False` (commands that run no RL step: `gradus sft`, `gradus eval`) skips the rules that tie the
    RL batch to the algorithm (groups, minibatches, DAPO's overlong window), so an algorithm knob
    never stops a command that does not use it. Every field is still checked against its own values.
    Raises ConfigError naming the field, its value and what is allowed.
    """
    from gradus.train.presets import resolve_algo, resolved_config

    check_fields(cfg)
    algo = resolve_algo(cfg)
    check_fields(resolved_config(cfg, algo), note=f" (the {algo.name} preset's value)")
    if rl:
        _check_rl_rules(cfg, algo)
    _check_task_rules(cfg)
    reward_weights(cfg.task.rewards)
    return algo


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
    from gradus.rewards.worker import MAX_ABS_SCORE
    from gradus.train.scoring import parse_reward_specs

    specs = parse_reward_specs(text, None)  # the task is only read when text is empty
    for spec in specs:
        if not spec.name_or_path:
            raise ConfigError(f"task.rewards: an entry has no reward name, got {text!r}")
        if not (math.isfinite(spec.weight) and abs(spec.weight) <= MAX_ABS_SCORE):
            raise ConfigError(f"task.rewards: the weight of {spec.name_or_path!r} must be a finite number within "
                              f"+-{MAX_ABS_SCORE:g}, got {spec.weight} (in {text!r})")


def _check_rl_rules(cfg: TrainConfig, algo: ResolvedAlgo) -> None:
    r = cfg.rollout
    if r.group_size < 2 and not algo.uses_critic:
        raise ConfigError(f"rollout.group_size must be >= 2 for {algo.name} (group advantages need a group), "
                          f"got {r.group_size}")
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
    _check_lora(cfg.model)


# Module names (the last part of a dotted name) that LoRA must not adapt, and why.
_HEAD_NAMES = ("lm_head", "embed_out")
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")
HEAD_REASON = ("gradus computes log-probs from the lm head's weight as a plain linear layer (in chunks, never the "
               "whole [B, T, V] logits), so an adapter there would not be applied")
EMBEDDING_REASON = ("an embedding adapter merges into the embedding matrix, which small Qwen2 and Llama models (and "
                    "gradus' built-in ones) share with the lm head, so the exported model would not be the trained one")


def lora_targets(text: str) -> list[str]:
    """model.lora_targets as a list of module names (empty entries dropped)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_lora(m: ModelConfig) -> None:
    defaults = ModelConfig()
    if m.lora_r == 0:
        for key in ("lora_alpha", "lora_dropout", "lora_targets"):
            if getattr(m, key) != getattr(defaults, key):
                raise ConfigError(f"model.{key} is only used with LoRA (model.lora_r > 0), got {getattr(m, key)!r} "
                                  "with model.lora_r=0; set model.lora_r (e.g. 16) or leave it out")
        return
    targets = lora_targets(m.lora_targets)
    if not targets:
        raise ConfigError(f"model.lora_targets must name at least one module with model.lora_r={m.lora_r} "
                          f"(e.g. {defaults.lora_targets})")
    for name in targets:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _HEAD_NAMES:
            raise ConfigError(f"model.lora_targets: {name!r} is the lm head, which cannot take an adapter: "
                              f"{HEAD_REASON}")
        if leaf in _EMBEDDING_NAMES:
            raise ConfigError(f"model.lora_targets: {name!r} is the token embedding, which cannot take an adapter: "
                              f"{EMBEDDING_REASON}")
