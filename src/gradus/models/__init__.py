"""Models for gradus: a local char tokenizer, tiny dense and MoE LMs, HF save/load, the PPO critic, and MoE
routing capture/replay."""

from gradus.models.critic import build_critic, completion_values, critic_values
from gradus.models.loading import (
    DTYPES,
    ModelLoadError,
    check_finite,
    check_model_dir,
    check_safetensors,
    check_special_tokens,
    load_critic,
    load_pretrained,
    save_pretrained,
    stop_token_ids,
)
from gradus.models.lora import load_model
from gradus.models.routing import (
    ROUTERS,
    MoeLayout,
    RoutingCapture,
    capture,
    moe_layout,
    moe_layout_or_none,
    replay,
    routing_mismatch,
)
from gradus.models.tiny import MOE_ARCHS, TINY_SIZES, TinySize, build_tiny_model, tiny_config
from gradus.models.tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer

__all__ = [
    "DTYPES",
    "DEFAULT_ALPHABET",
    "MOE_ARCHS",
    "ROUTERS",
    "SPECIAL_TOKENS",
    "TINY_SIZES",
    "ModelLoadError",
    "MoeLayout",
    "RoutingCapture",
    "TinySize",
    "build_char_tokenizer",
    "build_critic",
    "build_tiny_model",
    "capture",
    "check_finite",
    "check_model_dir",
    "check_safetensors",
    "check_special_tokens",
    "completion_values",
    "critic_values",
    "load_critic",
    "load_model",
    "load_pretrained",
    "moe_layout",
    "moe_layout_or_none",
    "replay",
    "routing_mismatch",
    "save_pretrained",
    "stop_token_ids",
    "tiny_config",
]
