"""The one place a rollout engine is built from a config (`rollout.engine`), for training and for
`gradus eval` alike, and the rules that say where each engine can run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gradus.config import ConfigError, TrainConfig
from gradus.models import stop_token_ids
from gradus.rollout import LocalEngine, RolloutEngine


def engine_problem(cfg: TrainConfig, distributed: bool) -> str | None:
    """Why `rollout.engine` cannot run with the rest of this config, or None."""
    if cfg.rollout.engine != "vllm":
        return None
    if cfg.rollout.dtype is not None:
        return "rollout.dtype is the local engine's sampling copy; with rollout.engine=vllm set vllm.dtype"
    if distributed:
        return ("rollout.engine=vllm runs in one process for now; under torchrun use rollout.engine=local "
                "(each rank samples its share with its own replica)")
    if cfg.model.lora_r > 0:
        return ("rollout.engine=vllm with model.lora_r > 0: the engine would need the merged weights after every "
                "update; train LoRA with rollout.engine=local")
    return None


def check_engine(cfg: TrainConfig, device: torch.device) -> None:
    """Before any work: the engine's package imports on this device (EngineError says what to install)."""
    if cfg.rollout.engine == "vllm":
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"rollout.engine=vllm runs on cpu or cuda, not {device.type}; use rollout.engine=local")
        from gradus.rollout.vllm_engine import import_vllm

        import_vllm(on_gpu=device.type == "cuda")


def build_engine(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, model_dir: Path,
                 device: torch.device) -> RolloutEngine:
    """The engine `cfg.rollout.engine` names. `model` is what the local engine samples with (the trainer's
    module); vLLM starts from `model_dir` (the same weights on disk) and is then fed in memory."""
    eos = stop_token_ids(model, tokenizer)
    if cfg.rollout.engine == "local":
        return LocalEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos)
    from gradus.rollout.vllm_engine import VLLMEngine, VLLMSettings

    check_engine(cfg, device)
    v = cfg.vllm
    settings = VLLMSettings(dtype=cfg.model.dtype if v.dtype == "auto" else v.dtype,
                            memory_fraction=v.memory_fraction, kv_cache_gb=v.kv_cache_gb,
                            max_model_len=v.max_model_len, eager=v.eager, sleep=v.sleep, seed=cfg.run.seed)
    return VLLMEngine(model_dir, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos, settings=settings,
                      device=device)
