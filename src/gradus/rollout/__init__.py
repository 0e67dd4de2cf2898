"""Rollout: sampling G completions per prompt, the most expensive stage of RL post-training."""

from gradus.rollout.engine import EngineError, RolloutEngine
from gradus.rollout.local import LocalEngine, model_positions
from gradus.rollout.sampling import (
    apply_temperature,
    filter_logits,
    next_tokens,
    sample_from_probs,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)
from gradus.rollout.types import RolloutBatch, SamplingParams

__all__ = [
    "EngineError",
    "LocalEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "apply_temperature",
    "filter_logits",
    "model_positions",
    "next_tokens",
    "sample_from_probs",
    "sample_tokens",
    "top_k_filter",
    "top_p_filter",
]
