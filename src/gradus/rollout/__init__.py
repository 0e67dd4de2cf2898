"""Rollout: sampling G completions per prompt, the most expensive stage of RL post-training. The engines are
found by name in `gradus.rollout.registry`; `gradus.rollout.engine` is the interface they implement."""

from gradus.rollout.engine import EngineError, RolloutEngine
from gradus.rollout.local import LocalEngine, model_positions
from gradus.rollout.sampling import (
    apply_temperature,
    next_tokens,
    sample_from_probs,
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
    "model_positions",
    "next_tokens",
    "sample_from_probs",
    "top_k_filter",
    "top_p_filter",
]
