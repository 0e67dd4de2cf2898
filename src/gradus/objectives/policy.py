"""Policy objectives of the ladder PPO -> GRPO -> DAPO -> GSPO -> SAPO (+ Dr. GRPO, CISPO), and the
members adopted after it (GMPO, DPPO, Clip-Cov, KL-Cov).

All take log-probs only, never models. Shapes: [B, T] per token (B completions, T completion
positions), `loss_mask` 1 where a token counts; advantages [B] (per sequence) or [B, T].
The returned loss is the scalar to minimise, -J without any KL term.

Per-token losses, with r = pi_theta / pi_old and A the advantage:

- clip (PPO, Schulman et al. 2017, eq. 7; GRPO, Shao et al. 2024, eq. 3; DAPO, Yu et al. 2025,
  eq. 8 with eps_low != eps_high):   l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
  dual clip (Ye et al. 2020): for A < 0 also bounded above by -A c, i.e. l = min(l, -c A).
- GSPO (Zheng et al. 2025, eq. 5-7): the same clip, on s_i = exp(mean_t log r_it), one per sequence.
- GSPO-token (eq. 13): s_it = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)], clipped per token:
  the value of s_i with the gradient of a per-token ratio, so advantages may vary per token.
- SAPO (Gao et al. 2025): l = -f(r) A with the soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau,
  tau = tau_pos if A > 0 else tau_neg. d f / d r = 4 sigma (1 - sigma): 1 at r = 1.
- CISPO (MiniMax-M1, 2025, eq. 4): l = -sg[clip(r, 1 - eps_low, 1 + eps_high)] A log pi_theta;
  every token keeps a gradient, the clipped importance weight only scales it.
- GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673): one ratio per
  sequence, the geometric mean of token ratios each clipped in log space on the side its advantage
  pushes, l_i = -A_i exp(1/|o_i| sum_t c_t) with c_t = min(log r_t, eps_high) for A_i > 0 and
  max(log r_t, -eps_low) for A_i < 0 (the paper's range (e^-0.4, e^0.4): eps = 0.4). Spread over the
  row's tokens like GSPO, so seq-mean-token-mean is the mean over sequences.
- DPPO (Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement Learning", arXiv 2602.04879):
  the trust region is a divergence between pi_old and pi_theta at the token's state, estimated on the
  sampled token's two-outcome ("binary") distribution, not the ratio. A token is masked when it moved
  too far in the direction its advantage pushes:
      TV (dppo_tv):  A > 0 and p - p_old > delta_high, or A <= 0 and p - p_old < -delta_low
      KL (dppo_kl):  D = p_old log(p_old / p) + (1 - p_old) log((1 - p_old) / (1 - p)) (Bernoulli KL) and
                     A > 0, p > p_old, D > delta_high, or A <= 0, p < p_old, D > delta_low
  with p = pi_theta(y_t), p_old = pi_old(y_t) (deltas: TV 0.15, KL 0.05, the paper's recipe);
  l = -M A sg[min(r, C)] log pi_theta: value in CISPO's form, gradient M min(r, C) A grad log pi, the
  paper's masked surrogate; C (ratio_cap) truncates the weight (its section 5.4; None: no cap).
- Clip-Cov and KL-Cov (Cui et al. 2025, arXiv 2505.22617, section 5; see covariance.py): Clip-Cov is
  PPO's clip with a few random high-covariance tokens detached (their loss set to 0); KL-Cov is the
  unclipped -A r with the penalty beta |log r| added on the top-covariance tokens.

Departures, all deliberate: log-ratios are clamped to +-20 before exp (finite for any finite input;
inside the bound nothing changes); for GSPO and GMPO, advantages given per token are reduced to
their masked mean per sequence (use gspo_token for truly per-token advantages).
"""

from __future__ import annotations

import torch

from gradus.objectives._tensor import (
    LOG_RATIO_BOUND,
    at_least_fp32,
    check_shapes,
    masked_mean,
    masked_min_max,
    per_token,
    row_lengths,
)
from gradus.objectives.aggregation import agg_loss
from gradus.objectives.covariance import clip_cov_selection, kl_cov_selection, token_covariance
from gradus.objectives.presets import PolicyObjective, resolve_objective


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    algo: str,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **overrides: float | str | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of `algo` (a preset; `overrides` change its knobs) and its metrics.

    Args:
        logp: log pi_theta of the sampled tokens, differentiable. [B, T]
        old_logp: log pi_old of the same tokens (the sampling policy). [B, T]
        advantages: per sequence [B] or per token [B, T].
        loss_mask: 1 where a token counts. [B, T]
        algo: one of gradus.objectives.PRESETS.
        num_tokens, num_seqs: global denominators for the aggregation (see agg_loss).
        token_weight: detached per-token weights [B, T] that multiply the per-token losses after
            the trust region, e.g. a rollout/training mismatch correction (see correction.py);
            the aggregation's denominators are unchanged. None: no multiplication.
        generator: the random source of Clip-Cov's token draw (a CPU generator; None: torch's global
            one); no other objective draws.
        overrides: knobs of the preset, e.g. clip_high=0.28, agg="token-mean".
    Returns:
        (loss, metrics): loss a 0-dim fp32 (or fp64) tensor; metrics plain floats.
    """
    objective = resolve_objective(algo, **overrides)
    return objective_loss(
        objective, logp, old_logp, advantages, loss_mask, num_tokens=num_tokens, num_seqs=num_seqs,
        token_weight=token_weight, generator=generator,
    )


def objective_loss(
    obj: PolicyObjective,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`policy_loss` for an already resolved objective (what a trainer calls every step)."""
    check_shapes("logp", logp, old_logp=old_logp, loss_mask=loss_mask)
    if token_weight is not None:
        check_shapes("logp", logp, token_weight=token_weight)
    logp, old_logp = at_least_fp32(logp), at_least_fp32(old_logp).detach()
    mask = loss_mask.to(logp.dtype)  # [B, T]
    adv = per_token(at_least_fp32(advantages).detach(), logp).to(logp.dtype)  # [B, T]
    log_ratio = logp - old_logp  # [B, T]

    if obj.ratio == "sequence":
        loss_mat, stats = _gspo_sequence(obj, log_ratio, adv, mask)
    elif obj.ratio == "geometric":
        loss_mat, stats = _gmpo(obj, log_ratio, adv, mask)
    elif obj.ratio == "sequence_token":
        ratio = _gspo_token_ratio(logp, log_ratio, mask)  # [B, T]
        loss_mat, stats = _clipped(obj, ratio, adv, mask)
    else:
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # [B, T]
        if obj.trust == "clip":
            loss_mat, stats = _clipped(obj, ratio, adv, mask)
        elif obj.trust == "gate":
            loss_mat, stats = _sapo(obj, ratio, adv, mask)
        elif obj.trust == "cispo":
            loss_mat, stats = _cispo(obj, ratio, logp, adv, mask)
        elif obj.trust in ("tv", "binary_kl"):
            loss_mat, stats = _dppo(obj, ratio, logp, old_logp, adv, mask)
        elif obj.trust == "clip_cov":
            loss_mat, stats = _clip_cov(obj, ratio, logp, adv, mask, generator)
        else:
            loss_mat, stats = _kl_cov(obj, ratio, logp, log_ratio, adv, mask)

    if token_weight is not None:
        # after the trust region, so the weight scales what the clip (or gate) left; for GSPO it
        # multiplies the per-sequence loss spread over the tokens, token by token
        loss_mat = loss_mat * token_weight.detach().to(loss_mat.dtype)  # [B, T]
    loss = agg_loss(
        loss_mat, mask, obj.agg, norm=obj.agg_norm, num_tokens=num_tokens, num_seqs=num_seqs
    )
    # k3 estimate of KL(pi_old || pi_theta) per token: (r - 1) - log r >= 0.
    with torch.no_grad():
        lr = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        stats["approx_kl"] = masked_mean(torch.expm1(lr) - lr, mask)
    return loss, _to_floats(stats)


def _clipped(
    obj: PolicyObjective, ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token (also GRPO, DAPO, Dr. GRPO and GSPO-token). -> [B, T]"""
    low, high = 1.0 - obj.clip_low, 1.0 + obj.clip_high
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(low, high)  # [B, T]
    loss_mat = torch.maximum(unclipped, clipped)  # [B, T]
    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "clip_frac_low": masked_mean(((r < low) & (adv < 0)).to(mask.dtype), mask),
            "clip_frac_high": masked_mean(((r > high) & (adv > 0)).to(mask.dtype), mask),
        }
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(r, mask)
        stats["ratio_mean"] = masked_mean(r, mask)
    if obj.dual_clip is not None:
        bound = -adv * obj.dual_clip  # [B, T]
        dual = torch.where(adv < 0, torch.minimum(loss_mat, bound), loss_mat)  # [B, T]
        stats["dual_clip_frac"] = masked_mean(((adv < 0) & (loss_mat > bound)).to(mask.dtype), mask)
        loss_mat = dual
    return loss_mat, stats


def _gspo_sequence(
    obj: PolicyObjective, log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: clip the sequence ratio s_i; the per-sequence loss is spread over its tokens. -> [B, T]"""
    lengths = row_lengths(mask).clamp(min=1)  # [B]
    log_s = (log_ratio * mask).sum(-1) / lengths  # [B]
    s = torch.exp(log_s.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # [B]
    seq_adv = (adv * mask).sum(-1) / lengths  # [B]
    low, high = 1.0 - obj.clip_low, 1.0 + obj.clip_high
    per_seq = torch.maximum(-seq_adv * s, -seq_adv * s.clamp(low, high))  # [B]
    loss_mat = per_seq[:, None].expand_as(mask)  # [B, T]
    with torch.no_grad():
        seq_mask = (row_lengths(mask) > 0).to(mask.dtype)  # [B]
        sd = s.detach()
        stats = {
            # fractions of *sequences*: GSPO clips whole sequences
            "clip_frac_low": masked_mean(((sd < low) & (seq_adv < 0)).to(mask.dtype), seq_mask),
            "clip_frac_high": masked_mean(((sd > high) & (seq_adv > 0)).to(mask.dtype), seq_mask),
            "ratio_mean": masked_mean(sd, seq_mask),
        }
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(sd, seq_mask)
    return loss_mat, stats


def _gspo_token_ratio(logp: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]: value s_i, gradient s_i * grad log pi(y_it). -> [B, T]"""
    lengths = row_lengths(mask).clamp(min=1)  # [B]
    log_s = ((log_ratio * mask).sum(-1) / lengths).detach()  # [B]
    log_s_it = log_s[:, None] + logp - logp.detach()  # [B, T]
    return torch.exp(log_s_it.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # [B, T]


def _sapo(
    obj: PolicyObjective, ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO's soft gate: l = -A * sigmoid(tau (r - 1)) * 4 / tau. -> [B, T]"""
    # full_like keeps the ratio's dtype (torch.where on Python floats would round tau to fp32)
    tau = torch.full_like(ratio, obj.tau_neg).masked_fill(adv > 0, obj.tau_pos)  # [B, T]
    sig = torch.sigmoid(tau * (ratio - 1.0))  # [B, T]
    loss_mat = -adv * sig * 4.0 / tau  # [B, T]
    with torch.no_grad():
        r = ratio.detach()
        gate_weight = 4.0 * sig.detach() * (1.0 - sig.detach())  # [B, T] d f / d r, 1 on-policy
        stats = {"gate_weight_mean": masked_mean(gate_weight, mask), "ratio_mean": masked_mean(r, mask)}
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(r, mask)
    return loss_mat, stats


def _cispo(
    obj: PolicyObjective, ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: REINFORCE weighted by the clipped, stop-gradient importance ratio. -> [B, T]"""
    r = ratio.detach()
    low = None if obj.clip_low is None else 1.0 - obj.clip_low
    high = 1.0 + obj.clip_high
    weight = r.clamp(min=low, max=high)  # [B, T]
    loss_mat = -weight * adv * logp  # [B, T]
    with torch.no_grad():
        below = (r < low) if low is not None else torch.zeros_like(r, dtype=torch.bool)
        stats = {
            "clip_frac_low": masked_mean(below.to(mask.dtype), mask),
            "clip_frac_high": masked_mean((r > high).to(mask.dtype), mask),
            "ratio_mean": masked_mean(r, mask),
        }
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(r, mask)
    return loss_mat, stats


def _gmpo(
    obj: PolicyObjective, log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GMPO: the geometric mean of token ratios, each clipped in log space on its advantage's side. -> [B, T]"""
    lengths = row_lengths(mask).clamp(min=1)  # [B]
    seq_adv = (adv * mask).sum(-1) / lengths  # [B]
    positive = (seq_adv > 0)[:, None].expand_as(mask)  # [B, T]
    # A > 0: a token may raise the mean by at most eps_high; A < 0: lower it by at most eps_low. The
    # other side is left free, as PPO's clip leaves a ratio free where the objective gets worse.
    clipped = torch.where(positive, log_ratio.clamp(max=obj.clip_high), log_ratio.clamp(min=-obj.clip_low))  # [B, T]
    log_s = (clipped * mask).sum(-1) / lengths  # [B]
    s = torch.exp(log_s.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))  # [B]
    loss_mat = (-seq_adv * s)[:, None].expand_as(mask)  # [B, T]
    with torch.no_grad():
        lr = log_ratio.detach()
        seq_mask = (row_lengths(mask) > 0).to(mask.dtype)  # [B]
        sd = s.detach()
        negative = (seq_adv < 0)[:, None]  # [B, 1]
        stats = {
            # fractions of *tokens* held at the bound (GMPO clips token by token)
            "clip_frac_high": masked_mean((positive & (lr > obj.clip_high)).to(mask.dtype), mask),
            "clip_frac_low": masked_mean((negative & (lr < -obj.clip_low)).to(mask.dtype), mask),
            "ratio_mean": masked_mean(sd, seq_mask),
        }
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(sd, seq_mask)
    return loss_mat, stats


def _dppo(
    obj: PolicyObjective, ratio: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPPO: REINFORCE weighted by sg[min(r, C)], masked where the binary TV or KL left the trust region. -> [B, T]"""
    with torch.no_grad():
        lp = logp.detach()
        p, p_old = torch.exp(lp), torch.exp(old_logp)  # [B, T]
        if obj.trust == "tv":
            moved_up = (p - p_old) > obj.clip_high  # [B, T]
            moved_down = (p - p_old) < -obj.clip_low  # [B, T]
        else:
            div = binary_kl(old_logp, lp)  # [B, T]
            # `not <=` so that a NaN divergence (a log-prob above 0 on input) masks the token, as in verl
            moved_up = ~(div <= obj.clip_high) & (p > p_old)  # [B, T]
            moved_down = ~(div <= obj.clip_low) & (p < p_old)  # [B, T]
        # A > 0 pushes p up, A <= 0 down (A = 0 contributes nothing either way)
        outside = torch.where(adv > 0, moved_up, moved_down)  # [B, T]
        valid = (~outside).to(logp.dtype)  # [B, T]
        r = ratio.detach()
        weight = r if obj.ratio_cap is None else r.clamp(max=obj.ratio_cap)  # [B, T]
    loss_mat = -adv * weight * valid * logp  # [B, T]
    with torch.no_grad():
        capped = (r > obj.ratio_cap) if obj.ratio_cap is not None else torch.zeros_like(outside)
        stats = {
            "clip_frac_high": masked_mean((outside & (adv > 0)).to(mask.dtype), mask),
            "clip_frac_low": masked_mean((outside & (adv < 0)).to(mask.dtype), mask),
            "cap_frac": masked_mean((capped & ~outside).to(mask.dtype), mask),
            "ratio_mean": masked_mean(r, mask),
        }
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(r, mask)
    return loss_mat, stats


def binary_kl(old_logp: torch.Tensor, logp: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(Bern(p_old) || Bern(p)) of the sampled token's probability before and after the update, with
    1 - p from expm1 (accurate near p = 1) and eps in the second term's logarithm as in verl (finite at
    p = 1). [B, T] -> [B, T]"""
    first = torch.exp(old_logp) * (old_logp - logp)  # [B, T]
    second = -torch.expm1(old_logp) * torch.log((-torch.expm1(old_logp) + eps) / (-torch.expm1(logp) + eps))  # [B, T]
    return first + second


def _clip_cov(
    obj: PolicyObjective, ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip-Cov: PPO's clip, then a random few high-covariance tokens the clip left alone lose their loss
    and gradient. -> [B, T]"""
    low, high = 1.0 - obj.clip_low, 1.0 + obj.clip_high
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(low, high)  # [B, T]
    with torch.no_grad():
        cov = token_covariance(logp, adv, mask)  # [B, T]
        by_ppo = clipped.detach() > unclipped.detach()  # [B, T]
        candidates = (mask > 0) & ~by_ppo & (cov > obj.cov_low) & (cov < obj.cov_high)  # [B, T]
        detach = clip_cov_selection(cov, candidates, obj.cov_frac, mask, generator)  # [B, T]
    loss_mat = torch.maximum(unclipped, clipped) * (~detach).to(ratio.dtype)  # [B, T]
    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "clip_frac_low": masked_mean(((r < low) & (adv < 0)).to(mask.dtype), mask),
            "clip_frac_high": masked_mean(((r > high) & (adv > 0)).to(mask.dtype), mask),
            "cov_detached_frac": masked_mean(detach.to(mask.dtype), mask),
            "ratio_mean": masked_mean(r, mask),
        }
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(r, mask)
    return loss_mat, stats


def _kl_cov(
    obj: PolicyObjective, ratio: torch.Tensor, logp: torch.Tensor, log_ratio: torch.Tensor, adv: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-Cov: the unclipped surrogate, plus beta |log r| on the top-covariance tokens. -> [B, T]"""
    with torch.no_grad():
        penalised = kl_cov_selection(token_covariance(logp, adv, mask), obj.cov_frac, mask)  # [B, T]
    abs_kl = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).abs()  # [B, T]
    loss_mat = -adv * ratio + obj.cov_coef * abs_kl * penalised.to(ratio.dtype)  # [B, T]
    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "cov_penalised_frac": masked_mean(penalised.to(mask.dtype), mask),
            "abs_kl": masked_mean(abs_kl.detach(), mask),
            "ratio_mean": masked_mean(r, mask),
        }
        stats["ratio_min"], stats["ratio_max"] = masked_min_max(r, mask)
    return loss_mat, stats


def _to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device-to-host transfer for all metrics."""
    names = sorted(stats)
    values = torch.stack([stats[n].detach().to(torch.float64) for n in names]).tolist()
    return dict(zip(names, values, strict=True))
