"""Getting the pieces of a run: device, task, policy (a user's HF directory, or the built-in tiny
model warm-started by SFT and cached), reference and critic."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from gradus.config import ConfigError, TrainConfig
from gradus.models import (
    ModelLoadError,
    build_char_tokenizer,
    build_tiny_model,
    check_model_dir,
    lora,
    save_pretrained,
)
from gradus.rollout.local import config_positions, model_positions
from gradus.rollout.registry import engine_class
from gradus.tasks import DatasetError, FileTask, Task, get_task
from gradus.train.checkpoint import MARKER, checkpoint_dir, latest_checkpoint
from gradus.train.data import prompt_problems
from gradus.train.sft import run_sft

SFT_CACHE_VERSION = 1
# build_char_tokenizer()'s fingerprint when the version-1 cache keys were made (see warm_start_key)
_CHAR_TOKENIZER_V1 = "aa90672ff7fbfb15"



def preflight(cfg: TrainConfig) -> tuple[torch.device, Task]:
    """The checks `gradus.config_checks.validate` cannot make, because they read the machine, the model's
    config.json or the task's data; no model is loaded. Run after `validate`, before any work (warm start,
    model load, run folder). Returns the device and the task (with any rows task.on_error=skip dropped)."""
    device = resolve_device(cfg.run.device)
    engine_class(cfg.rollout.engine).check_machine(cfg, device)  # e.g. vLLM installed and importable here
    if cfg.model.path:
        check_model_path(cfg.model.path)
        check_moe_path(cfg)
    if cfg.model.lora_r > 0:  # targets and rank against the model's layers, from its config; says what is adapted
        plan = lora.plan_from_config(cfg.model)
        if plan is not None and _is_rank_zero():
            print(f"gradus: {plan.describe()}", file=sys.stderr, flush=True)
    task = build_task(cfg)
    check_positions(cfg, task, task.heldout(cfg.task.heldout_size))
    heldout_set(task, cfg.task.heldout_size)  # check_positions may have dropped every held-out row
    return device, task


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"run.device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device={name!r} but MPS is not available on this machine")
    return device


def build_task(cfg: TrainConfig, say: bool = True) -> Task:
    """The configured task (the config was validated: task.data_file and task.difficulty apply); `say`: print
    how a file was split (once a run: the warm start builds the task again, quietly)."""
    t = cfg.task
    kwargs: dict[str, Any] = {"seed": cfg.run.seed}
    if t.name == "file":
        kwargs.update(path=t.data_file, prompt_field=t.prompt_field, answer_field=t.answer_field,
                      template=t.template, on_error=t.on_error)
    if t.difficulty is not None:
        kwargs["difficulty"] = t.difficulty
    if t.name in ("file", "math_file"):
        kwargs["heldout_size"] = t.heldout_size  # at most: a file holds out a share that fits it
    try:
        task = get_task(t.name, **kwargs)
    except ValueError as err:
        raise ConfigError(f"task: {err}") from err
    note = getattr(task, "split_note", None)
    if note and say and _is_rank_zero():
        print(f"gradus: {note}", file=sys.stderr, flush=True)
    return task


def check_prompt_lengths(task: Task, tokenizer: Any, model: Any, cfg: TrainConfig) -> None:
    """Every prompt of a file must leave room for rollout.max_new_tokens in the model's positions: rows that
    do not raise a ConfigError naming file and row, or are dropped when task.on_error=skip."""
    positions = model_positions(model)
    if positions is None:
        return
    new = cfg.rollout.max_new_tokens
    if new >= positions:
        raise ConfigError(f"rollout.max_new_tokens={new} leaves no room for a prompt in the model's "
                          f"{positions} positions")
    if isinstance(task, FileTask):  # procedural prompts are short; the rollout engine refuses any that is not
        _check_file_rows(task, tokenizer, positions, new)


def _check_file_rows(task: FileTask, tokenizer: Any, positions: int, new: int) -> None:
    """Every row of a file must fit `positions` with `new` tokens to spare: raise naming file and rows,
    or drop them (task.on_error=skip) and say so."""
    try:
        dropped = task.check_rows(lambda rows: prompt_problems(task, tokenizer, rows, positions=positions,
                                                               max_new_tokens=new), "are too long for the model")
    except DatasetError as err:
        raise ConfigError(f"task: {err} (shorten them, or set task.on_error=skip to leave them out)") from err
    if dropped and _is_rank_zero():
        print(f"gradus: {task.split_note}", file=sys.stderr, flush=True)


def heldout_set(task: Task, n: int) -> list[Any]:
    """The task's first `n` held-out problems; a ConfigError when there are none (e.g. task.on_error=skip
    dropped every held-out row of a file): a run never trains, nor eval reports, without a measure."""
    heldout = task.heldout(n)
    if not heldout:
        note = getattr(task, "split_note", None)
        raise ConfigError(f"task: the held-out set is empty{f' ({note})' if note else ''}")
    return heldout


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def cache_root(cfg: TrainConfig) -> Path:
    if cfg.run.cache_dir:
        return Path(cfg.run.cache_dir)
    return Path(os.environ.get("GRADUS_CACHE", Path.home() / ".cache" / "gradus"))


def warm_start_key(cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """Everything the warm start's weights depend on, as the cache key of the built-in model.

    A task read from a file adds the file's content (not its name: an edited file is another
    task), its fields, template and on_error. The tokenizer is in the key only when it is not the
    one the version-1 keys were made with, so the default task's existing caches still hit.
    """
    key: dict[str, Any] = {"v": SFT_CACHE_VERSION, "size": cfg.model.tiny_size, "arch": cfg.model.arch,
                           "task": cfg.task.name, "difficulty": cfg.task.difficulty, "sft": vars(cfg.sft),
                           "seed": cfg.run.seed}
    if _demonstrates(cfg.task.name):  # a multi-turn warm start's episodes are as long as a run's
        key["max_turns"] = cfg.env.max_turns
    from gradus.tasks import task_class

    if (version := getattr(task_class(cfg.task.name), "version", None)) is not None:
        key["task_version"] = version  # a task whose problems or demonstrations changed: a new warm start
    data = Path(cfg.task.data_file) if cfg.task.name == "file" else None
    if cfg.task.name == "math_file":
        from gradus.tasks import math_word_problems_path

        data = math_word_problems_path()
    if data is not None:
        t = cfg.task
        key["data"] = {"sha256": _file_sha256(data), "prompt_field": t.prompt_field,
                       "answer_field": t.answer_field, "template": t.template, "on_error": t.on_error}
    specials = [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token]
    fingerprint = hashlib.sha256((tokenizer.backend_tokenizer.to_str() + repr(specials)).encode()).hexdigest()[:16]
    if fingerprint != _CHAR_TOKENIZER_V1:
        key["tokenizer"] = fingerprint
    return key


def _demonstrates(task_name: str) -> bool:
    """Whether the task's warm start demonstrates whole episodes (a multi-turn task)."""
    from gradus.tasks import task_class

    return hasattr(task_class(task_name), "demonstration")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise ConfigError(f"task.data_file: cannot read {path}: {err}") from err
    return digest.hexdigest()


def tiny_model_dir(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """The built-in tiny model, SFT-warm-started on the task; trained once, then read from cache."""
    tokenizer = build_char_tokenizer()
    key = warm_start_key(cfg, tokenizer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(cfg) / f"tiny-{cfg.model.tiny_size}-{cfg.task.name}-{digest}"
    if (path / "gradus_sft.json").is_file():
        return path
    task = build_task(cfg, say=False)
    check_positions(cfg, task, [])  # the rows the trainer's task drops, this one drops too
    try:
        model = build_tiny_model(cfg.model.tiny_size, tokenizer=tokenizer, arch=cfg.model.arch, seed=cfg.run.seed)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    model.to(resolve_device(cfg.run.device))
    metrics = run_sft(model, tokenizer, task, cfg.sft, seed=cfg.run.seed, progress=progress,
                      threads=cfg.run.threads, max_turns=cfg.env.max_turns)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model.cpu(), tokenizer, tmp)
    (tmp / "gradus_sft.json").write_text(json.dumps({"key": key, **metrics}, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a cache entry that looks complete
    return path


def check_positions(cfg: TrainConfig, task: Task, examples: list[Any]) -> None:
    """Prompt + rollout.max_new_tokens must fit the model's positions. Checked as soon as the model's
    config is known (its config.json, or the built-in model's sizes), before any warm start or load.
    The prompts measured: a file's every row (too long ones named, or dropped with task.on_error=skip);
    for a procedural task, `examples` (the held-out set) and the first training batch."""
    from gradus.models import tiny_config
    from gradus.train.data import encode_prompts

    if cfg.model.path:
        path = Path(cfg.model.path)
        try:
            path = lora.plain_model_dir(path)  # a LoRA run's policy: its base model's positions
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):  # ModelLoadError is a ValueError
            return  # an unreadable model folder is reported by the model loader
        limit = config_positions(config)
        where = f"{path / 'config.json'}"
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    else:
        tokenizer = build_char_tokenizer()
        limit = tiny_config(cfg.model.tiny_size, tokenizer=tokenizer, arch=cfg.model.arch).max_position_embeddings
        where = f"the built-in {cfg.model.tiny_size} model"
    engine = engine_class(cfg.rollout.engine)
    served = engine.max_positions(cfg)
    if served is not None and (not isinstance(limit, int) or served < limit):
        limit, where = served, f"rollout.engine={engine.name} (vllm.max_model_len={served})"
    if not isinstance(limit, int):
        return
    new = cfg.rollout.max_new_tokens
    if isinstance(task, FileTask):  # every row, named, honouring task.on_error (the warm start reads them too)
        if new >= limit:
            raise ConfigError(f"rollout.max_new_tokens={new} leaves no room for a prompt in the {limit} positions "
                              f"of {where} (max_position_embeddings)")
        if tokenizer is not None:
            _check_file_rows(task, tokenizer, limit, new)
        return
    longest = 0
    if tokenizer is not None:
        sample = [*examples, *task.train_batch(0, cfg.rollout.prompts_per_step)]
        try:
            longest = max(map(len, encode_prompts(task, tokenizer, sample).ids), default=0)
        except ValueError as err:
            raise ConfigError(f"task: {err}") from err
    if longest + new > limit:
        raise ConfigError(
            f"rollout.max_new_tokens={new}: the longest prompt ({longest} tokens, of the held-out set and the "
            f"first training batch) plus {new} new tokens is {longest + new}, past the {limit} positions of "
            f"{where} (max_position_embeddings); rollout.max_new_tokens must be <= {max(0, limit - longest)}")


def check_moe_path(cfg: TrainConfig) -> None:
    """The MoE settings `gradus.config_checks.moe_problem` checks, for a model.path, read from its config.json
    (a LoRA adapter folder: its base's): a dense model is refused before it is loaded."""
    from gradus.config_checks import moe_problem

    folder = lora.plain_model_dir(cfg.model.path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # reported by the model loader
    experts = any(config.get(key) for key in ("num_experts", "num_local_experts", "n_routed_experts"))
    moe_problem(cfg, config.get("model_type"), is_moe=bool(experts), where=f"{folder / 'config.json'}")


def check_model_path(path: str) -> None:
    """Fail early, naming the field, when model.path is not a loadable model directory (or LoRA adapter folder)."""
    try:
        if lora.adapter_base(path) is not None:
            lora.check_adapter_dir(path)
            return
        check_model_dir(path)
    except ModelLoadError as err:
        raise ConfigError(f"model.path: {err}") from err


def resolve_model_dir(path: str | Path, *, label: str = "model.path") -> tuple[Path, str | None]:
    """The model directory that `path` stands for, and a note saying what was picked (None: `path` itself).

    Besides a model directory, `path` may be a gradus run folder (or its checkpoints/ folder): the policy of
    its latest complete checkpoint; or one checkpoint folder: its policy. Anything else is returned as it
    is, for `check_model_dir` to explain what is wrong with it. A LoRA run's policy is an adapter folder
    (see `gradus.models.lora`). `label` starts each error message (the field or command given the path).
    """
    path = Path(path)
    if not path.is_dir() or (path / "config.json").is_file() or (path / lora.ADAPTER_CONFIG).is_file():
        return path, None
    checkpoints = checkpoint_dir(Path()).name  # the name of a run's checkpoint folder
    if (path / "policy").is_dir() and path.parent.name == checkpoints:
        if not (path / MARKER).is_file():
            raise ConfigError(f"{label}: {path} is an incomplete checkpoint (no {MARKER} marker: its save "
                              "was interrupted); give the run folder to use its latest complete checkpoint")
        return path / "policy", f"{path} is a checkpoint: loading its policy, {path / 'policy'}"
    run = path.parent if path.name == checkpoints else path
    if not checkpoint_dir(run).is_dir():
        return path, None
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"{label}: {run} is a run folder with no complete checkpoint in "
                          f"{checkpoint_dir(run)} (none has a {MARKER} marker)")
    policy = ckpt / "policy"
    return policy, f"{path} is a run folder: loading the policy of its latest complete checkpoint, {policy}"


def initial_model_dir(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """The model a run starts from, as an absolute path (checkpoints and LoRA adapters name it as their base)."""
    if cfg.model.path:
        return Path(cfg.model.path).absolute()
    return tiny_model_dir(cfg, progress=progress).absolute()
