"""Per-token estimators of KL(pi_theta || pi_ref) from log-probs of sampled tokens.

With x = log(pi_ref / pi_theta) for a token sampled from pi_theta (Schulman, "Approximating KL
divergence", 2020):

- k1 = -x                 unbiased, high variance, can be negative
- k2 = x^2 / 2            biased, low variance, >= 0
- k3 = e^x - x - 1        unbiased, low variance, >= 0 (GRPO's estimator, DeepSeekMath eq. 4)

The result is per token [B, T]; aggregate it with `agg_loss` like any loss. x is clamped to +-20
before exp so that k3 stays finite for any finite input.
"""

from __future__ import annotations

import torch

from gradus.objectives._tensor import LOG_RATIO_BOUND, at_least_fp32, check_shapes

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference. [B, T] -> [B, T]

    Args:
        logp: log pi_theta of the sampled tokens (differentiable). [B, T]
        ref_logp: log pi_ref of the same tokens (treated as constant). [B, T]
        estimator: "k1", "k2" or "k3".
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    check_shapes("logp", logp, ref_logp=ref_logp)
    logp = at_least_fp32(logp)
    x = at_least_fp32(ref_logp).detach().to(logp.dtype) - logp  # [B, T] log(pi_ref / pi_theta)
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x.square()
    x = x.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    # expm1(x) - x keeps precision near x = 0, where e^x - 1 - x is a difference of near-equal numbers
    return torch.expm1(x) - x  # [B, T]
