"""Tiny causal LMs built from scratch, for tests, examples and CPU-scale experiments.

They are ordinary `transformers` models, so everything in gradus that works on them works unchanged
on a real checkpoint:

- dense: `Qwen2ForCausalLM` (arch="qwen2"), `LlamaForCausalLM` ("llama");
- mixture-of-experts: `Qwen2MoeForCausalLM` ("qwen2_moe"), `Qwen3MoeForCausalLM` ("qwen3_moe"),
  `MixtralForCausalLM` ("mixtral"); see `MOE_ARCHS` and `models/routing.py` for routing capture/replay.

Sizes are named in `TINY_SIZES`; the parameter counts quoted there are for the 260-token
`build_char_tokenizer()` vocabulary and arch="qwen2" (Llama has no q/k/v biases, so it is a few
hundred parameters smaller; the MoE archs are larger, see `MOE_ARCHS`).
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
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
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
    """Width of the SwiGLU MLP (MoE archs: each expert is half as wide, see `MOE_ARCHS`)."""
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
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
}

MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral")
TINY_ARCHS = ("qwen2", "llama", *MOE_ARCHS)  # the model.arch choices
"""The mixture-of-experts archs. Every decoder block is an MoE block of `MOE_NUM_EXPERTS` SwiGLU
experts, each `intermediate_size // 2` wide, of which `MOE_TOP_K` run per token (so a token's routed
compute matches the dense MLP). Per arch, as in their public checkpoints:

- qwen2_moe: plus an always-on shared expert (also `intermediate_size // 2` wide) with a sigmoid gate;
  top-k probabilities NOT renormalised (norm_topk_prob=False, as Qwen1.5-MoE-A2.7B);
- qwen3_moe: q/k RMSNorm in attention, no shared expert; top-k probabilities renormalised
  (norm_topk_prob=True, as Qwen3-30B-A3B);
- mixtral: no shared expert; top-k probabilities always renormalised.

The load-balancing loss (Switch Transformer, Fedus et al. 2021, eqs. 4-6) is configured with
`router_aux_loss_coef = MOE_AUX_LOSS_COEF`, but `output_router_logits` stays False in the config:
a forward asks for it with `model(..., output_router_logits=True)` (then `out.aux_loss` is set, and
added to `out.loss` when labels are given). Turned on in the config, every forward computes it,
and in transformers 5.24 an incremental decoding step with a KV cache then fails: the loss is
masked with the full [B, past + 1] attention mask while the routers saw only the [B, 1] new tokens.
"""
MOE_NUM_EXPERTS = 4
MOE_TOP_K = 2
MOE_AUX_LOSS_COEF = 0.01  # alpha = 1e-2, the Switch Transformer's choice


def _moe_fields(arch: str, spec: TinySize) -> dict:
    """The config fields that make `arch`'s blocks MoE blocks; {} for a dense arch."""
    if arch not in MOE_ARCHS:
        return {}
    width = spec.intermediate_size // 2
    fields = {"num_experts_per_tok": MOE_TOP_K, "router_aux_loss_coef": MOE_AUX_LOSS_COEF,
              "output_router_logits": False}
    if arch == "mixtral":  # Mixtral's `intermediate_size` is the width of one expert
        return fields | {"num_local_experts": MOE_NUM_EXPERTS, "intermediate_size": width,
                         "router_jitter_noise": 0.0}
    fields |= {"num_experts": MOE_NUM_EXPERTS, "moe_intermediate_size": width,
               "norm_topk_prob": arch == "qwen3_moe", "decoder_sparse_step": 1, "mlp_only_layers": []}
    if arch == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = width
    return fields


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
    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": True,
    }
    return config_cls(**(fields | _moe_fields(arch, spec)), **_special_ids(tokenizer))


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
