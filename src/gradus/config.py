"""One typed config for a run: dataclasses, read from YAML and `section.key=value` overrides.

The resolved config (every value, defaults included) is saved with every run as `config.yaml`.
An unknown key is an error that suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    path: str | None = None
    """Local Hugging Face model directory; None: the built-in tiny model (SFT warm-started, cached)."""
    tiny_size: str = "micro"
    """Built-in tiny model size (see gradus.models.TINY_SIZES); only used when path is None."""
    arch: str = "qwen2"
    """Built-in tiny model architecture: qwen2 or llama."""
    dtype: str = "float32"
    """Training dtype: float32 or bfloat16."""
    chunk_size: int = 1024
    """Tokens per chunk in the memory-bounded log-prob computation."""


@dataclass
class SFTConfig:
    steps: int = 300
    """Optimizer steps of the supervised warm start (short on purpose: it teaches the format, RL the skill)."""
    batch_size: int = 64
    """Examples per SFT step."""
    lr: float = 3e-3
    """SFT learning rate (AdamW, cosine decay after warm-up)."""
    warmup_steps: int = 30
    """Linear warm-up steps."""


@dataclass
class TaskConfig:
    name: str = "countdown"
    """Task: a built-in name (arithmetic, countdown, math_file) or 'file' for data_file."""
    difficulty: int | None = None
    """Difficulty level of procedural tasks; None: the task's default."""
    data_file: str | None = None
    """JSONL, Parquet or CSV file (task 'file')."""
    prompt_field: str = "question"
    """Prompt column of data_file."""
    answer_field: str = "answer"
    """Answer column of data_file."""
    template: str = "{prompt}"
    """Plain prompt template, used when the tokenizer has no chat template."""
    on_error: str = "raise"
    """Bad rows in data_file: raise or skip."""
    rewards: str | None = None
    """Comma-separated reward[:weight] list (names or module:function); None: the task's default."""
    reward_timeout_s: float = 5.0
    """Time limit of one reward request (a chunk, or a completion retried alone); past it its worker is killed."""
    strict_rewards: bool = False
    """Make a failing or timed-out reward fatal instead of scoring 0."""
    heldout_size: int = 500
    """Held-out problems for evaluation; a data file holds out at most 20% of its distinct prompts (said)."""


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: completions sampled per prompt."""
    prompts_per_step: int = 64
    """Prompts (groups) per training step."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    max_new_tokens: int = 16
    """Hard limit on completion length (DAPO's L_max)."""


@dataclass
class AlgoConfig:
    name: str = "grpo"
    """Algorithm preset: ppo, grpo, dapo, gspo, gspo_token, sapo, dr_grpo, cispo."""
    clip_low: float | None = None
    """Lower clip epsilon; None: the preset's."""
    clip_high: float | None = None
    """Upper clip epsilon; None: the preset's."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (token-ratio clip algos only)."""
    tau_pos: float | None = None
    """SAPO gate temperature for positive advantages."""
    tau_neg: float | None = None
    """SAPO gate temperature for negative advantages."""
    agg: str | None = None
    """Loss aggregation mode; None: the preset's."""
    agg_norm: float | None = None
    """Constant of seq-mean-token-sum-norm; None: max_new_tokens."""
    kl_coef: float | None = None
    """KL coefficient (in the loss; in the reward for PPO); None: the preset's. 0 loads no reference."""
    kl_estimator: str | None = None
    """KL estimator: k1, k2 or k3; None: the preset's (k1 in PPO's reward, k3 in the others' loss)."""
    monitor_kl: bool = False
    """Load the reference model even with kl_coef 0 and log the KL to it (no effect on the loss)."""
    adv_scale: str | None = None
    """Group advantage scaling: group, batch or none; None: the preset's."""
    dynamic_sampling: bool | None = None
    """DAPO dynamic sampling; None: the preset's."""
    max_gen_rounds: int = 4
    """Dynamic sampling: at most this many generation rounds per step."""
    overlong_shaping: bool | None = None
    """DAPO soft overlong punishment; None: the preset's."""
    overlong_cache: int = 4
    """DAPO L_cache, in tokens."""
    overlong_filter: bool = False
    """Mask truncated completions out of the loss."""
    gamma: float = 1.0
    """PPO: GAE discount."""
    lam: float = 0.95
    """PPO: GAE lambda."""
    value_clip: float = 0.2
    """PPO: value-loss clip range."""
    critic_lr: float = 1e-3
    """PPO: critic learning rate."""
    critic_warmup: int = 0
    """PPO: first steps that train only the critic (measured on the default task: it did not help)."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Actor peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear learning-rate warm-up, in optimizer steps."""
    schedule: str = "cosine"
    """Learning rate after warm-up: constant, linear (to 10%) or cosine (to 10%) over the run."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    epochs: int | None = None
    """Passes over each rollout batch; None: the algo preset's (see `gradus algos`)."""
    minibatches: int | None = None
    """Optimizer steps per pass (the batch is split into this many); None: the algo preset's."""
    token_budget: int = 16384
    """Most tokens in one forward/backward; larger minibatches are accumulated in pieces."""
    max_bad_steps: int = 5
    """Stop the run after this many consecutive updates skipped for NaN/inf."""


@dataclass
class RunConfig:
    steps: int = 250
    """RL training steps."""
    seed: int = 0
    """Seed of everything: model init, data order, sampling."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    name: str | None = None
    """Run folder name; None: algo and a timestamp."""
    eval_every: int = 50
    """Held-out evaluation every this many steps (0: only before and after)."""
    save_every: int = 50
    """Checkpoint every this many steps."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    cache_dir: str | None = None
    """Where the SFT-warm-started built-in model is cached; None: ~/.cache/gradus."""
    progress: bool = True
    """Show a progress bar."""
    threads: int | None = None
    """CPU threads; None: every core while the machine is idle, fewer while other work keeps cores busy."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the field."""


def all_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. 'algo.clip_high'."""
    cfg = TrainConfig() if cfg is None else cfg
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def field_doc(key: str) -> str:
    """The one-line docstring of a dotted key (read from this file's source)."""
    return _field_docs().get(key, "")


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set a dotted key, converting strings to the field's type. Unknown key -> ConfigError."""
    parts = key.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
            raise ConfigError(_unknown(key))
        target = getattr(target, part)
    names = {f.name: f for f in dataclasses.fields(target)}
    if parts[-1] not in names or dataclasses.is_dataclass(getattr(target, parts[-1])):
        raise ConfigError(_unknown(key))
    hint = typing.get_type_hints(type(target))[parts[-1]]
    setattr(target, parts[-1], _coerce(key, value, hint))


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (nested sections), then `key=value` overrides, in that order."""
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
        for key, value in _flatten(data).items():
            set_key(cfg, key, value)
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides or []]
    for key, value in items:
        set_key(cfg, key, value)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. algo.clip_high=0.3)")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def _unknown(key: str) -> str:
    keys = all_keys()
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    same_leaf = [k for k in keys if k.split(".")[-1] == leaf]
    guess = same_leaf[0] if same_leaf else (close[0] if close else None)
    if guess is None:
        close_leaf = difflib.get_close_matches(leaf, [k.split(".")[-1] for k in keys], n=1, cutoff=0.6)
        guess = next((k for k in keys if close_leaf and k.endswith("." + close_leaf[0])), None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return f"unknown config key {key!r}{hint} (`gradus train --help-config` lists every key)"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert `value` (from YAML or a command line string) to the type `hint`."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise ConfigError(f"{key} cannot be None")
    for typ in (t for t in options if t is not type(None)):
        try:
            if typ is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                    return value.lower() in ("true", "1", "yes", "on")
                raise ValueError
            if typ is int and isinstance(value, float | str) and float(value) != int(float(value)):
                raise ValueError
            if typ is int:
                return int(float(value)) if isinstance(value, str) else int(value)
            return typ(value)
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def _field_docs() -> dict[str, str]:
    """Map dotted keys to the docstring line under each field (CleanRL-style field docs)."""
    import ast
    import inspect

    source = inspect.getsource(inspect.getmodule(TrainConfig))
    tree = ast.parse(source)
    hints = typing.get_type_hints(TrainConfig)
    section_of = {hints[f.name].__name__: f.name for f in dataclasses.fields(TrainConfig)}
    docs: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in section_of:
            body = node.body
            for a, b in zip(body, body[1:], strict=False):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                    docs[f"{section_of[node.name]}.{a.target.id}"] = b.value.value.strip()
    return docs
