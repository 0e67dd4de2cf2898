"""gradus.objectives: the pure tensor math of PPO, GRPO, DAPO, GSPO and SAPO, of the members adopted
after them (GMPO, DPPO, Clip-Cov, KL-Cov; RLOO, REINFORCE++, pass@k and GDPO advantages), of the
entropy diagnostics, and of the rollout/training mismatch correction (TIS, MIS, IcePop, rejection).

Every function takes tensors (log-probs, rewards, values, masks), never models, so it plugs into
any training loop. Shapes: [B, T] per token, `loss_mask` 1 where a token counts. See
docs/objectives.md for the formulas, defaults and references.
"""

from gradus.objectives.advantages import (
    ADV_SCALES,
    gae,
    gdpo_advantages,
    group_advantages,
    masked_whiten,
    outcome_token_rewards,
    passk_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_rewards,
)
from gradus.objectives.aggregation import AGG_MODES, agg_loss
from gradus.objectives.correction import (
    CORRECTIONS,
    DEFAULT_BOUNDS,
    REJECTIONS,
    Rejection,
    correction_weights,
    effective_sample_size,
    mismatch_metrics,
    rejection_mask,
    resolve_bounds,
    resolve_rejection,
)
from gradus.objectives.covariance import covariance_metrics, token_covariance
from gradus.objectives.estimators import (
    ESTIMATORS,
    AdvantageInputs,
    Advantages,
    AdvantageSettings,
    Estimator,
    estimate,
    estimator,
)
from gradus.objectives.kl import KL_ESTIMATORS, kl_penalty
from gradus.objectives.policy import objective_loss, policy_loss
from gradus.objectives.presets import (
    ALGORITHMS,
    KNOBS_BY_TRUST,
    PRESETS,
    Algorithm,
    PolicyObjective,
    TrainerDefaults,
    resolve_objective,
    valid_knobs,
)
from gradus.objectives.sequence import perplexity, sequence_log_ratio
from gradus.objectives.shaping import dynamic_sampling_keep, overlong_penalty
from gradus.objectives.value import value_loss

__all__ = [
    "ADV_SCALES",
    "AGG_MODES",
    "ALGORITHMS",
    "CORRECTIONS",
    "DEFAULT_BOUNDS",
    "ESTIMATORS",
    "KL_ESTIMATORS",
    "KNOBS_BY_TRUST",
    "PRESETS",
    "REJECTIONS",
    "AdvantageInputs",
    "AdvantageSettings",
    "Advantages",
    "Algorithm",
    "Estimator",
    "PolicyObjective",
    "Rejection",
    "TrainerDefaults",
    "agg_loss",
    "correction_weights",
    "covariance_metrics",
    "dynamic_sampling_keep",
    "effective_sample_size",
    "estimate",
    "estimator",
    "gae",
    "gdpo_advantages",
    "group_advantages",
    "kl_penalty",
    "masked_whiten",
    "mismatch_metrics",
    "objective_loss",
    "outcome_token_rewards",
    "overlong_penalty",
    "passk_advantages",
    "perplexity",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rejection_mask",
    "resolve_bounds",
    "resolve_objective",
    "resolve_rejection",
    "rloo_advantages",
    "sequence_log_ratio",
    "sequence_rewards",
    "token_covariance",
    "valid_knobs",
    "value_loss",
]
