"""One typed config for a run: dataclasses, read from YAML and `section.key=value` overrides.

Every field carries its valid values next to its default (`spec(default, gt=0)`, `choices=...`), and
`gradus.config_checks.validate` checks all of them, and the rules that tie fields together, before
any work. The resolved config (every value, the algorithm preset's included) is saved with every
run as `config.yaml`. An unknown key is an error that suggests the key meant: by meaning for the
names other trainers use (`learning_rate` -> `optim.lr`), else by spelling, else nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradus.config_aliases import suggest
from gradus.config_spec import Allowed, spec

# algo.rollout_rejection: names only here; gradus.objectives.resolve_rejection checks them against REJECTIONS
_REJECTION_PATTERN = r"[\w\s,]*"
_REJECTION_TEXT = "comma-separated names of gradus.objectives.REJECTIONS (token_k1, seq_mean_k3, ...)"
_NUMBER = r"\s*[0-9.eE+-]+\s*"
_THRESHOLD_PATTERN = rf"{_NUMBER}(_{_NUMBER})?(,{_NUMBER}(_{_NUMBER})?)*"

# The attention and MLP projections of Llama and Qwen2 (and most decoders that copy their names).
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class ModelConfig:
    path: str | None = spec(None, fixed=True, text="a model directory")
    """Local Hugging Face model directory; None: the built-in tiny model (SFT warm-started, cached)."""
    tiny_size: str = spec("micro", choices="gradus.models.tiny:TINY_SIZES")
    """Built-in tiny model size (see gradus.models.TINY_SIZES); only used when path is None."""
    arch: str = spec("qwen2", choices="gradus.models.tiny:TINY_ARCHS")
    """Built-in tiny model architecture: qwen2, llama, or mixture-of-experts qwen2_moe, qwen3_moe, mixtral."""
    dtype: str = spec("float32", choices=("float32", "bfloat16"))
    """Training dtype: float32 or bfloat16."""
    router_aux_coef: float | None = spec(None, ge=0)
    """MoE: weight of the router's load-balancing loss in training; None: the model config's (0 for dense)."""
    chunk_size: int = spec(1024, ge=1)
    """Tokens per chunk in the memory-bounded log-prob computation."""
    lora_r: int = spec(0, fixed=True, ge=0)
    """LoRA rank: the policy trains PEFT adapters on lora_targets, its own weights frozen; 0: full fine-tuning."""
    lora_alpha: float = spec(32.0, fixed=True, gt=0)
    """LoRA scale: each adapter's output is multiplied by lora_alpha / lora_r (a fixed number, as in PEFT and TRL)."""
    lora_dropout: float = spec(0.0, fixed=True, ge=0, lt=1)
    """Dropout on each adapter's input in the update's passes (not in sampling or the no-grad log-prob passes)."""
    lora_targets: str = spec(LORA_TARGETS, fixed=True, pattern=r"\s*([\w.-]+(\s*,\s*[\w.-]+)*)?\s*",
                             text="comma-separated module names")
    """Modules that get an adapter (PEFT target_modules; a YAML list works too); never lm_head or the embeddings."""


@dataclass
class SFTConfig:
    steps: int = spec(250, ge=0)
    """Optimizer steps of the supervised warm start (short on purpose: it teaches the format and leaves room
    between what the model says first and what it can sample, which RL closes; docs/training.md)."""
    batch_size: int = spec(64, ge=1)
    """Examples per SFT step."""
    lr: float = spec(3e-3, gt=0)
    """SFT learning rate (AdamW, cosine decay after warm-up)."""
    warmup_steps: int = spec(30, ge=0)
    """Linear warm-up steps."""


@dataclass
class TaskConfig:
    name: str = spec("countdown", fixed=True, choices="gradus.tasks:available_tasks")
    """Task: a built-in name (arithmetic, countdown, math_file) or 'file' for data_file."""
    difficulty: int | None = spec(None, choices="gradus.tasks.arithmetic:LEVELS")
    """Difficulty level of procedural tasks; None: the task's default."""
    data_file: str | None = spec(None, fixed=True, text="a file path")
    """JSONL, Parquet or CSV file (task 'file')."""
    prompt_field: str = spec("question", pattern=r".+", text="a column name")
    """Prompt column of data_file."""
    answer_field: str = spec("answer", pattern=r".+", text="a column name")
    """Answer column of data_file."""
    template: str = spec("{prompt}", pattern=r".*\{prompt\}.*", text="a text containing {prompt}")
    """Plain prompt template, used when the tokenizer has no chat template."""
    on_error: str = spec("raise", choices=("raise", "skip"))
    """Bad rows in data_file: raise or skip."""
    rewards: str | None = spec(None, text="name[:weight],... with finite weights")
    """Comma-separated reward[:weight] list (names or module:function); None: the task's default."""
    reward_timeout_s: float = spec(5.0, gt=0)
    """Time limit of one reward request (a chunk, or a completion retried alone); past it its worker is killed."""
    strict_rewards: bool = spec(False)
    """Make a failing or timed-out reward fatal instead of scoring 0."""
    heldout_size: int = spec(500, ge=1)
    """Held-out problems for evaluation; a data file holds out at most 20% of its distinct prompts (said)."""


@dataclass
class RolloutConfig:
    group_size: int = spec(8, ge=1)
    """G: completions sampled per prompt."""
    prompts_per_step: int = spec(16, ge=1)
    """Prompts (groups) per training step."""
    temperature: float = spec(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = spec(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0: off)."""
    top_k: int = spec(0, ge=0)
    """Top-k sampling (0: off)."""
    max_new_tokens: int = spec(16, ge=1)
    """Hard limit on completion length (DAPO's L_max)."""
    dtype: str | None = spec(None, choices=("float32", "bfloat16"))
    """Local engine: sample with a copy of the policy in this dtype, synced after every update; None: model.dtype."""
    engine: str = spec("local", choices="gradus.rollout.registry:ENGINES")
    """What samples completions (training and evaluation): local (the policy itself) or vllm (see vllm.*)."""


@dataclass
class EnvConfig:
    name: str | None = spec(None, fixed=True, pattern=r".+",
                            text="a built-in environment (guess), module:Class or path/to/file.py:Class")
    """Multi-turn episodes with this environment (docs/environments.md); None: the task's own (task guess has
    one), else one completion per prompt."""
    options: str | None = spec(None, pattern=r"\s*\{.*\}\s*", text='a JSON object, e.g. {"feedback": false}')
    """Keyword arguments of the environment's constructor, as a JSON object."""
    max_turns: int = spec(4, ge=1)
    """Model turns per episode at most."""
    max_tokens: int = spec(96, ge=2)
    """Completion tokens per episode at most, the model's and the environment's together (also cut to what the
    prompt leaves of the model's positions); each turn is at most rollout.max_new_tokens."""
    timeout_s: float = spec(10.0, gt=0)
    """Time limit of each environment call (reset, step, a tool call), in its worker process."""


@dataclass
class VLLMConfig:
    """Settings of the vLLM rollout engine (rollout.engine=vllm); colocated with training in one process."""

    dtype: str = spec("auto", choices=("auto", "float32", "bfloat16", "float16"))
    """The engine's weights and compute; auto: model.dtype (fp32 on CPU: sampling log-probs match training)."""
    memory_fraction: float = spec(0.3, gt=0, le=1)
    """GPU: share of the GPU's memory the engine may take (weights + KV cache); training uses the rest."""
    kv_cache_gb: float | None = spec(None, gt=0)
    """KV cache size in GiB; None: 1 GiB on CPU, memory_fraction on GPU."""
    max_model_len: int | None = spec(None, ge=1)
    """Longest prompt + completion the engine serves; None: the model's positions."""
    eager: bool = spec(True)
    """No CUDA graphs / torch.compile: starts in seconds (False: slower start, faster sampling on GPU)."""
    sleep: bool = spec(True)
    """GPU: free the engine's KV cache while the trainer updates (vLLM sleep mode); ignored on CPU."""


@dataclass
class AlgoConfig:
    name: str = spec("dapo", fixed=True, choices="gradus.objectives.presets:ALGORITHMS")
    """Algorithm: a key of gradus.objectives.ALGORITHMS (`gradus algos` shows their settings)."""
    clip_low: float | None = spec(None, gt=0, le=1)
    """Lower clip epsilon (gmpo: of the log-ratio; dppo_tv, dppo_kl: the divergence bound); None: the preset's."""
    clip_high: float | None = spec(None, gt=0)
    """Upper clip epsilon (gmpo: of the log-ratio; dppo_tv, dppo_kl: the divergence bound); None: the preset's."""
    dual_clip: float | None = spec(None, gt=1)
    """Dual-clip constant c > 1 (token-ratio clip algos only)."""
    tau_pos: float | None = spec(None, gt=0)
    """SAPO gate temperature for positive advantages."""
    tau_neg: float | None = spec(None, gt=0)
    """SAPO gate temperature for negative advantages."""
    agg: str | None = spec(None, choices="gradus.objectives.aggregation:AGG_MODES")
    """Loss aggregation mode; None: the preset's."""
    agg_norm: float | None = spec(None, gt=0)
    """Constant of seq-mean-token-sum-norm; None: max_new_tokens."""
    kl_coef: float | None = spec(None, ge=0)
    """KL coefficient (in the loss; in the reward for PPO); None: the preset's. 0 loads no reference."""
    kl_estimator: str | None = spec(None, choices="gradus.objectives.kl:KL_ESTIMATORS")
    """KL estimator: k1, k2 or k3; None: the preset's (k1 in PPO's reward, k3 in the others' loss)."""
    monitor_kl: bool = spec(False)
    """Load the reference model even with kl_coef 0 and log the KL to it (no effect on the loss)."""
    advantage: str | None = spec(None, choices="gradus.objectives.estimators:ESTIMATORS")
    """Advantage estimator (group, gae with a critic, rloo, reinforce_pp, grpo_passk, gdpo, ...); None: the preset's."""
    adv_scale: str | None = spec(None, choices="gradus.objectives.advantages:ADV_SCALES")
    """Group advantage scaling: group, batch or none; None: the preset's."""
    dynamic_sampling: bool | None = spec(None)
    """DAPO dynamic sampling; None: the preset's."""
    max_gen_rounds: int = spec(4, ge=1)
    """Dynamic sampling: at most this many generation rounds per step."""
    overlong_shaping: bool | None = spec(None)
    """DAPO soft overlong punishment; None: the preset's."""
    overlong_cache: int = spec(4, ge=1)
    """DAPO L_cache, in tokens."""
    overlong_filter: bool = spec(False)
    """Mask truncated completions out of the loss."""
    gamma: float = spec(1.0, ge=0, le=1)
    """PPO: GAE discount."""
    lam: float = spec(0.95, ge=0, le=1)
    """PPO: GAE lambda."""
    value_clip: float = spec(0.2, gt=0)
    """PPO: value-loss clip range."""
    critic_lr: float = spec(1e-3, gt=0)
    """PPO: critic learning rate."""
    critic_warmup: int = spec(0, ge=0)
    """PPO: first steps that train only the critic (measured on the default task: it did not help)."""
    routing_replay: str = spec("none", choices=("none", "r2", "r3"))
    """MoE: force the experts in training forwards: r2 the old policy's training routing, r3 the rollout's."""
    rollout_correction: str = spec("none", choices="gradus.objectives.correction:CORRECTIONS")
    """Rollout/training mismatch correction: none, tis, mis, seq_tis, seq_mis or icepop (docs/objectives.md)."""
    correction_low: float | None = spec(None, gt=0)
    """Lower bound of the ratio pi_train/pi_rollout kept by mis, seq_mis, icepop; None: the mode's (0.5)."""
    correction_high: float | None = spec(None, gt=0)
    """Cap (the tis modes) or upper bound (the mis modes, icepop) of that ratio; None: the mode's (2; icepop 5)."""
    rollout_rejection: str | None = spec(None, pattern=_REJECTION_PATTERN, text=_REJECTION_TEXT)
    """Drop tokens or sequences too far between pi_train and pi_rollout (verl's rollout_rs); None: none."""
    rejection_thresholds: str | None = spec(None, pattern=_THRESHOLD_PATTERN,
                                            text="comma-separated numbers, or low_high for a k1 criterion")
    """One bound per rollout_rejection criterion, or one for all (k1: low_high ratio bounds); None: the defaults."""
    ratio_cap: float | None = spec(None, ge=1)
    """DPPO: cap on its detached importance weight r (verl's clip_ratio_c); None: the preset's (no cap)."""
    cov_frac: float | None = spec(None, gt=0, le=1)
    """Clip-Cov, KL-Cov: share of a batch's tokens they act on; None: the preset's (2e-4, 2e-3)."""
    cov_low: float | None = spec(None, text="a number")
    """Clip-Cov: tokens whose covariance lies in (cov_low, cov_high) are its candidates; None: the preset's (1)."""
    cov_high: float | None = spec(None, text="a number")
    """Clip-Cov: the upper end of that band; None: the preset's (5)."""
    cov_coef: float | None = spec(None, gt=0)
    """KL-Cov: weight beta of its |log r| penalty on the chosen tokens; None: the preset's (1)."""


@dataclass
class OptimConfig:
    lr: float = spec(2e-4, gt=0)
    """Actor peak learning rate (AdamW)."""
    weight_decay: float = spec(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = spec(5, ge=0)
    """Linear learning-rate warm-up, in optimizer steps."""
    schedule: str = spec("cosine", choices=("constant", "linear", "cosine"))
    """Learning rate after warm-up: constant, linear (to 10%) or cosine (to 10%) over the run."""
    grad_clip: float = spec(1.0, gt=0)
    """Gradient-norm clip."""
    epochs: int | None = spec(None, ge=1)
    """Passes over each rollout batch; None: the algo preset's (see `gradus algos`)."""
    minibatches: int | None = spec(None, ge=1)
    """Optimizer steps per pass (the batch is split into this many); None: the algo preset's."""
    token_budget: int = spec(16384, ge=1)
    """Most tokens in one forward/backward; larger minibatches are accumulated in pieces."""
    max_bad_steps: int = spec(5, ge=1)
    """Stop the run after this many consecutive updates skipped for NaN/inf."""


@dataclass
class RunConfig:
    steps: int | None = spec(None, ge=1)
    """RL training steps; None: the algo preset's (`gradus algos`: more for those without dynamic sampling)."""
    seed: int = spec(0, fixed=True, ge=0, lt=2**32)
    """Seed of everything: model init, data order, sampling."""
    device: str = spec("auto", pattern=r"auto|cpu|mps|cuda(:[0-9]+)?", text="auto, cpu, cuda, cuda:N or mps")
    """cpu, cuda, cuda:N, mps or auto."""
    out_dir: str = spec("runs", fixed=True, pattern=r".+", text="a folder")
    """Parent folder of run folders."""
    name: str | None = spec(None, fixed=True, pattern=r".+", text="a folder name")
    """Run folder name; None: algo and a timestamp."""
    eval_every: int = spec(50, ge=0)
    """Held-out evaluation every this many steps (0: only before and after)."""
    save_every: int = spec(50, ge=0)
    """Checkpoint every this many steps."""
    keep_checkpoints: int = spec(2, ge=1)
    """Checkpoints kept on disk."""
    cache_dir: str | None = spec(None, text="a folder")
    """Where the SFT-warm-started built-in model is cached; None: ~/.cache/gradus."""
    progress: bool = spec(True)
    """Show a progress bar."""
    threads: int | None = spec(None, ge=1)
    """CPU threads; None: every core while the machine is idle, fewer while other work keeps cores busy."""
    parallel: str = spec("ddp", choices="gradus.parallel.modes:MODES")
    """Under torchrun: ddp (replicated weights) or fsdp2 (weights, gradients, optimizer state sharded); else none."""
    dist_timeout_s: float = spec(600.0, gt=0)
    """Under torchrun: a collective that waits this long on a dead or stuck rank ends the job."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run: RunConfig = field(default_factory=RunConfig)


_SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
_FIELDS = {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()}


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


def get_key(cfg: TrainConfig, key: str) -> Any:
    """The value of a dotted key, e.g. get_key(cfg, "optim.lr")."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def split_override(item: str) -> tuple[str, str]:
    """'section.key=value' -> ('section.key', 'value'); anything without '=' is a ConfigError."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. algo.clip_high=0.3)")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def fixed_on_resume() -> tuple[str, ...]:
    """The keys that say what a run is (`spec(..., fixed=True)`): changing one on --resume would continue another
    run's checkpoint."""
    return tuple(k for k in all_keys() if _FIELDS[k.split(".")[0]][k.split(".")[1]].metadata.get("fixed"))


def field_doc(key: str) -> str:
    """The one-line docstring of a dotted key (read from this file's source)."""
    return _field_docs().get(key, "")


def allowed(key: str) -> Allowed:
    """The valid values of a dotted key."""
    section, name = key.split(".")
    return _FIELDS[section][name].metadata["allowed"]


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set a dotted key, converting strings to the field's type. Unknown key -> ConfigError."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in _FIELDS:
        raise ConfigError(_section_given_a_value(parts[0], value))
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
    """Defaults, then the YAML file (nested sections), then `key=value` overrides, in that order.

    Values are converted to the fields' types here; their ranges are checked by
    `gradus.config_checks.validate`, which every command runs before any work.
    """
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        for key, value in _flatten(read_yaml(p)).items():
            try:
                set_key(cfg, key, value)
            except ConfigError as err:
                raise ConfigError(f"config file {p}: {err}") from None
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides or []]
    for key, value in items:
        set_key(cfg, key, value)
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping of sections; every way it cannot be read is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                          "save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path},{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def help_text(preset_values: Callable[[], dict[str, dict[str, Any]]] | None = None) -> str:
    """Every key with its default, valid values and meaning; for a default that is "the preset's",
    each algorithm's value (from `preset_values()`, e.g. `gradus.algorithm.preset_values`)."""
    presets = preset_values() if preset_values else {}
    lines = []
    for key in all_keys():
        section, name = key.split(".")
        f = _FIELDS[section][name]
        rule = f.metadata["allowed"].describe()
        rule = "true or false" if typing.get_type_hints(_SECTIONS[section])[name] in (bool, bool | None) else rule
        lines.append(f"{key:26s} default {_show(f.default):10s} {field_doc(key)} [{rule}]")
        if key in presets:
            by_value: dict[str, list[str]] = {}
            for algo, value in presets[key].items():
                if value is not None:  # None: the algorithm does not use the knob
                    by_value.setdefault(_show(value), []).append(algo)
            lines.append(f"{'':26s}   preset: " + "; ".join(f"{v} ({', '.join(a)})" for v, a in by_value.items()))
    return "\n".join(lines)


def _show(value: Any) -> str:
    return "None" if value is None else str(value).lower() if isinstance(value, bool) else f"{value!r}".strip("'")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is None and not prefix and k in _FIELDS:
            continue  # an empty section (`algo:` with nothing under it) changes nothing
        else:
            out[prefix + str(k)] = v
    return out


# The key a section's scalar most likely meant: `algo: grpo` is `algo.name: grpo`.
_SECTION_MAIN = {"algo": "name", "task": "name", "model": "path"}

def _section_given_a_value(section: str, value: Any) -> str:
    keys = [f"{section}.{f.name}" for f in dataclasses.fields(_SECTIONS[section])]
    if section in _SECTION_MAIN:
        main = _SECTION_MAIN[section]
        return (f"{section!r} is a section, not a key; did you mean {section}.{main}={value}? "
                f"(in YAML a section holds keys: `{section}: {{{main}: {value}}}`)")
    return f"{section!r} is a section, not a key; set one of its keys: {', '.join(keys)}"


def _unknown(key: str) -> str:
    guess, note = suggest(key, all_keys())
    hint = f"; did you mean {guess!r}{f' ({note})' if note else ''}?" if guess else ""
    return f"unknown config key {key!r}{hint} (`gradus train --help-config` lists every key)"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert `value` (from YAML or a command line string) to the type `hint`."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        if isinstance(value, str) and str in options and value.lower() in (allowed(key).options() or ()):
            return value.lower()  # a choice named "none" (algo.rollout_correction, algo.routing_replay)
        raise ConfigError(f"{key} cannot be None")
    if isinstance(value, list | tuple) and str in options and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML list for a comma-separated field (model.lora_targets, task.rewards)
    for typ in (t for t in options if t is not type(None)):
        try:
            if typ is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                    return value.lower() in ("true", "1", "yes", "on")
                raise ValueError
            if isinstance(value, bool):  # YAML's `lr: true` is not the number 1
                raise ValueError
            if typ is int and isinstance(value, float | str) and float(value) != int(float(value)):
                raise ValueError
            if typ is int:
                return int(float(value)) if isinstance(value, str) else int(value)
            return typ(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int("inf")
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


@functools.cache
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
