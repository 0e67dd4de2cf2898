"""Tiny Qwen2/Llama causal LMs built from scratch, for tests, examples and CPU-scale experiments.

They are ordinary `transformers` models (`Qwen2ForCausalLM`, `LlamaForCausalLM`), so everything in
gradus that works on them works unchanged on a real checkpoint. Sizes are named in `TINY_SIZES`; the
parameter counts quoted there are for the 260-token `build_char_tokenizer()` vocabulary and
arch="qwen2" (Llama has no q/k/v biases, so it is a few hundred parameters smaller).
All sizes tie the input and output embeddings: at this scale an untied head would be a large
fraction of the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)


@dataclass(frozen=True)
class TinySize:
    """Shape of one named tiny model."""

    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder blocks."""
    num_heads: int
    """Query heads; head_dim = hidden_size // num_heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when smaller than num_heads)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_params: int
    """Exact parameter count with the default char tokenizer and arch="qwen2" (checked by a test)."""


TINY_SIZES: dict[str, TinySize] = {
    # For unit tests: a forward+backward over a few hundred tokens takes milliseconds.
    "nano": TinySize(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=192, num_params=115_520),
    # For CPU experiments that should train in minutes.
    "micro": TinySize(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=384, num_params=821_888),
    # For longer CPU runs or a GPU.
    "small": TinySize(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4,
                      intermediate_size=768, num_params=4_791_552),
}

_ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """pad/bos/eos ids of the tokenizer; all three are required by generation and padding code."""
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)}; build_char_tokenizer() sets all three")
    return ids


def tiny_config(
    size: str, *, tokenizer: PreTrainedTokenizerBase, arch: str = "qwen2", max_positions: int = 512
) -> PretrainedConfig:
    """The HF config of a named tiny model (no weights are made)."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; valid sizes: {sorted(TINY_SIZES)}")
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {sorted(_ARCHS)}")
    spec = TINY_SIZES[size]
    config_cls, _ = _ARCHS[arch]
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **_special_ids(tokenizer),
    )


def build_tiny_model(
    size: str = "micro",
    *,
    tokenizer: PreTrainedTokenizerBase,
    arch: str = "qwen2",
    seed: int = 0,
    max_positions: int = 512,
) -> PreTrainedModel:
    """A freshly initialised tiny causal LM; the same (size, arch, seed, tokenizer) gives the same weights.

    The global torch RNG is left as it was: initialisation runs under a forked RNG seeded with `seed`.
    """
    config = tiny_config(size, tokenizer=tokenizer, arch=arch, max_positions=max_positions)
    _, model_cls = _ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config = GenerationConfig(**_special_ids(tokenizer))
    return model
