"""Advantage estimators: group-normalised outcome rewards (GRPO family), GAE (PPO), and the group
estimators adopted after them (RLOO, REINFORCE++, pass@k, GDPO).

group_advantages (DeepSeekMath, Shao et al. 2024, section 4.1.2: outcome supervision):
    A_i = (r_i - mean(group)) / (std(group) + eps)      scale="group"   (GRPO)
    A_i = (r_i - mean(group)) / (std(batch) + eps)      scale="batch"   (group mean, batch std)
    A_i =  r_i - mean(group)                            scale="none"    (Dr. GRPO, Liu et al. 2025)
std is the sample standard deviation (ddof = 1). A group whose rewards are all equal, or a group
of one, gets exactly 0.

Batch statistics (scale="batch", masked_whiten) take an optional `total`: a function that sums a
tensor over the shards of a batch split across processes (data parallel: an all-reduce). With it the
mean and variance are those of the whole batch, so each shard gets exactly its rows of the
single-process result. Without it they are the local batch's.

gae (Schulman et al. 2016, eq. 16), per token over the counted positions of each row:
    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lam)^l delta_{t+l},   R_t = A_t + V_t
where t+1 is the next *counted* position (positions with loss_mask 0 are skipped, not treated as
the end; after the last counted token V = 0). It is computed without a loop over tokens inside a
block: A_t = sum_{t' >= t} (gamma lam)^(c_t' - c_t) delta_t' with c the running count of counted
tokens, as a [K, K] matrix product per block of K tokens, blocks chained from the end by carrying
the advantage of the first counted token after the block.

rloo_advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs", arXiv 2402.14740): the leave-one-out baseline,
    A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) (r_i - mean(group))

reinforce_pp_advantages (Hu et al. 2025, "REINFORCE++", arXiv 2501.03262): per-token returns
of the per-token reward (PPO's: -beta KL_t on every token, the outcome on the last), whitened over the
batch's tokens:  G_t = sum_{s >= t} gamma^(s-t) r_s,   A_t = (G_t - mean) / std   (= gae with V = 0, lam = 1)

reinforce_pp_baseline_advantages (the same paper's "REINFORCE++ w/ Baseline", as verl 0.9 computes it):
the sequence's reward minus its group's mean, on every token, whitened over the batch's tokens:
    A_it = whiten(R_i - mean(group of R)),   R_i = r_i - beta sum_t KL_it   (the KL in the reward)

passk_advantages (Tang et al. 2025, "Optimizing Language Models for Inference Time Objectives using
Reinforcement Learning", arXiv 2503.19595; verl's grpo_passk): only the best completion of each group
gets a signal, its margin over the runner-up, scaled like group_advantages:
    A_i = (r_max - r_second) / scale  for i = argmax (the first on a tie: then the margin is 0),  else 0

gdpo_advantages (S.-Y. Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization",
arXiv 2601.05242): each of the K rewards normalised in its group on its own, then the weighted sum
normalised over the batch's completions:
    A_i = whiten_i( sum_k w_k group_advantages(r_k)_i )
so a reward with a small spread is not drowned by one with a large spread, as in GRPO on the sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradus.objectives._tensor import at_least_fp32, check_shapes
from gradus.objectives.shaping import _grouped

ADV_SCALES = ("group", "batch", "none")
GAE_BLOCK = 128


Total = Callable[[torch.Tensor], torch.Tensor]


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6, total: Total | None = None
) -> torch.Tensor:
    """Group-normalised advantages, one per completion. rewards [N] laid out group by group -> [N]"""
    if scale not in ADV_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {', '.join(ADV_SCALES)}")
    groups = _grouped(at_least_fp32(rewards), group_size)  # [N/G, G]
    centered = groups - groups.mean(dim=1, keepdim=True)  # [N/G, G]
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centered = centered / (std + eps)  # [N/G, G]
    elif scale == "batch":
        _, var = masked_moments(groups, torch.ones_like(groups), total)
        centered = centered / (var.sqrt() + eps)
    # An all-equal group must give exactly 0 (and not 0/0 with eps = 0): the mean of equal floats
    # can differ from them in the last bit, which the division by a tiny std would blow up.
    flat = (groups.amax(dim=1) == groups.amin(dim=1))[:, None]  # [N/G, 1]
    centered = torch.where(flat, torch.zeros_like(centered), centered)  # [N/G, G]
    return centered.reshape(-1)  # [N]


def outcome_token_rewards(
    scores: torch.Tensor, loss_mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0,
    turn_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO's per-token reward: -kl_coef * kl_t on every token, plus the outcome score on the last
    counted token of each row. scores [B], loss_mask [B, T], kl [B, T] -> [B, T]

    `turn_rewards` [B, T] (multi-turn episodes: each turn's reward at the turn's last token, 0 elsewhere) are
    placed where they are, on counted tokens, and the rest of the score (what no turn placed: DAPO's overlong
    penalty, a reward on a token the loss left out) on the last counted token; so every row's token rewards
    still sum to its score, and GAE discounts each turn's reward from its own turn (gamma < 1)."""
    mask = loss_mask.to(torch.float32 if scores.dtype != torch.float64 else scores.dtype)
    rewards = torch.zeros_like(mask)  # [B, T]
    if kl is not None and kl_coef != 0.0:
        check_shapes("loss_mask", loss_mask, kl=kl)
        rewards = rewards - kl_coef * at_least_fp32(kl).detach().to(mask.dtype) * mask
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    last = torch.where(mask > 0, positions, -1).amax(dim=-1)  # [B] -1 for an empty row
    has_token = last >= 0  # [B]
    outcome = at_least_fp32(scores).to(mask.dtype)  # [B]
    bonus = torch.zeros_like(mask)  # [B, T]
    if turn_rewards is not None:
        check_shapes("loss_mask", loss_mask, turn_rewards=turn_rewards)
        bonus = at_least_fp32(turn_rewards).to(mask.dtype) * mask  # [B, T] the turns' rewards on counted tokens
        outcome = outcome - bonus.sum(dim=-1)  # [B] what is left of each score
    bonus[has_token, last[has_token]] += outcome[has_token]
    return rewards + bonus


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    total: Total | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. All [B, T] -> (advantages [B, T], returns [B, T]).

    Returns are A + V before whitening (the critic's regression target). Both are 0 where
    loss_mask is 0. With whiten=True advantages are shifted and scaled to mean 0, variance 1
    over the counted tokens of the batch (of all shards, with `total`).
    """
    check_shapes("token_rewards", token_rewards, values=values, loss_mask=loss_mask)
    rewards = at_least_fp32(token_rewards)
    values = at_least_fp32(values).to(rewards.dtype)
    mask = loss_mask.to(rewards.dtype)
    B, T = rewards.shape
    next_values = _next_counted(values, mask)  # [B, T]
    deltas = (rewards + gamma * next_values - values) * mask  # [B, T]
    counts = mask.cumsum(dim=-1)  # [B, T] c_t
    decay = gamma * lam

    advantages = torch.zeros_like(rewards)  # [B, T]
    carry = rewards.new_zeros(B)  # [B] advantage of the first counted token after the block
    for end in range(T, 0, -GAE_BLOCK):
        start = max(0, end - GAE_BLOCK)
        c = counts[:, start:end]  # [B, K]
        K = end - start
        upper = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu()  # [K, K] t' >= t
        exponent = torch.where(upper, c[:, None, :] - c[:, :, None], 0.0)  # [B, K, K]
        weights = torch.where(upper, torch.pow(decay, exponent), 0.0)  # [B, K, K]
        inside = (weights @ deltas[:, start:end, None]).squeeze(-1)  # [B, K]
        tail = torch.pow(decay, counts[:, end - 1 : end] + 1 - c) * carry[:, None]  # [B, K]
        block = (inside + tail) * mask[:, start:end]  # [B, K]
        advantages[:, start:end] = block
        block_mask = mask[:, start:end]
        first = block_mask.argmax(dim=-1, keepdim=True)  # [B, 1] first counted position
        carry = torch.where(block_mask.any(dim=-1), block.gather(1, first).squeeze(1), carry)

    returns = (advantages + values) * mask  # [B, T]
    if whiten:
        advantages = masked_whiten(advantages, mask, total=total)
    return advantages, returns


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, total: Total | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the counted entries of x (over all shards when `total` is given);
    variance 0 with fewer than two entries. -> (mean [], var [])"""
    total = total or (lambda t: t)
    mask = mask.to(x.dtype)
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n.clamp(min=1)
    # centred second pass (not E[x^2] - mean^2, which cancels catastrophically for large means)
    var = total((((x - mean) * mask).square()).sum()) / (n - 1).clamp(min=1)
    return mean, var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total: Total | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over counted entries (unbiased var); 0 elsewhere. [B, T] -> [B, T]"""
    mean, var = masked_moments(x, mask, total)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def _next_counted(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V at the next counted position after t, 0 if there is none. [B, T] -> [B, T]"""
    B, T = values.shape
    positions = torch.arange(T, device=values.device).expand(B, T)  # [B, T]
    idx = torch.where(mask > 0, positions, T)  # [B, T] T = "none"
    after = torch.cat([idx[:, 1:], idx.new_full((B, 1), T)], dim=1)  # [B, T] candidates t' > t
    nxt = after.flip(-1).cummin(dim=-1).values.flip(-1)  # [B, T] first counted t' > t
    padded = torch.cat([values, values.new_zeros(B, 1)], dim=1)  # [B, T + 1] index T reads 0
    return padded.gather(1, nxt)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the others in its group; exactly 0 for an all-equal group.
    rewards [N] laid out group by group -> [N]"""
    if group_size < 2:
        raise ValueError(f"RLOO's leave-one-out baseline needs groups of at least 2, got {group_size}")
    groups = _grouped(at_least_fp32(rewards), group_size)  # [N/G, G]
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)  # [N/G, G] mean of the others
    flat = (groups.amax(dim=1) == groups.amin(dim=1))[:, None]  # [N/G, 1]
    return torch.where(flat, torch.zeros_like(groups), groups - others).reshape(-1)  # [N]


def sequence_rewards(
    rewards: torch.Tensor, loss_mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """A completion's reward with the KL in it, R_i = r_i - kl_coef sum_t kl_it over its counted tokens
    (RLOO's and REINFORCE++-baseline's shaping). rewards [N], loss_mask [N, T], kl [N, T] -> [N]"""
    out = at_least_fp32(rewards)  # [N]
    if kl is not None and kl_coef != 0.0:
        check_shapes("loss_mask", loss_mask, kl=kl)
        kl = at_least_fp32(kl).detach().to(out.dtype)  # [N, T]
        out = out - kl_coef * torch.where(loss_mask > 0, kl, torch.zeros_like(kl)).sum(-1)  # [N]
    return out


@torch.no_grad()
def reinforce_pp_advantages(
    token_rewards: torch.Tensor, loss_mask: torch.Tensor, *, gamma: float = 1.0, total: Total | None = None
) -> torch.Tensor:
    """REINFORCE++: discounted per-token returns, whitened over the counted tokens of the batch (of every
    shard with `total`). token_rewards [N, T] (see outcome_token_rewards), loss_mask [N, T] -> [N, T]"""
    advantages, _ = gae(token_rewards, torch.zeros_like(at_least_fp32(token_rewards)), loss_mask, gamma=gamma,
                        lam=1.0, whiten=True, total=total)
    return advantages


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, loss_mask: torch.Tensor, group_size: int, *, total: Total | None = None
) -> torch.Tensor:
    """REINFORCE++-baseline: reward minus its group's mean, on every counted token, whitened over the batch's
    counted tokens. rewards [N] (see sequence_rewards), loss_mask [N, T] -> [N, T]"""
    centered = group_advantages(rewards, group_size, scale="none")  # [N] exactly 0 for an all-equal group
    mask = loss_mask.to(centered.dtype)  # [N, T]
    return masked_whiten(centered[:, None] * mask, mask, total=total)  # [N, T]


def passk_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6, total: Total | None = None
) -> torch.Tensor:
    """pass@k: the margin of each group's best completion over the runner-up, on the best alone.
    rewards [N] laid out group by group -> [N]"""
    if group_size < 2:
        raise ValueError(f"the pass@k advantage compares a group's best two completions: groups of at least 2, "
                         f"got {group_size}")
    if scale not in ADV_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {', '.join(ADV_SCALES)}")
    groups = _grouped(at_least_fp32(rewards), group_size)  # [N/G, G]
    top = torch.topk(groups, 2, dim=1).values  # [N/G, 2]
    margin = top[:, 0] - top[:, 1]  # [N/G]
    if scale == "group":
        margin = margin / (groups.std(dim=1) + eps)
    elif scale == "batch":
        _, var = masked_moments(groups, torch.ones_like(groups), total)
        margin = margin / (var.sqrt() + eps)
    best = groups.argmax(dim=1)  # [N/G] the first maximum
    out = torch.zeros_like(groups)  # [N/G, G]
    out[torch.arange(groups.shape[0]), best] = margin
    return out.reshape(-1)  # [N]


def gdpo_advantages(
    reward_parts: torch.Tensor,
    weights: tuple[float, ...] | list[float] | torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    total: Total | None = None,
) -> torch.Tensor:
    """GDPO: each reward normalised in its group, weighted, summed, then whitened over the batch's completions
    (of every shard with `total`). reward_parts [N, K], weights [K] -> [N]"""
    parts = at_least_fp32(reward_parts)  # [N, K]
    if parts.dim() != 2:
        raise ValueError(f"reward_parts must be [N, K], got shape {tuple(parts.shape)}")
    w = torch.as_tensor(weights, dtype=parts.dtype, device=parts.device)  # [K]
    if w.shape != parts.shape[1:]:
        raise ValueError(f"{w.numel()} reward weights for {parts.shape[1]} rewards")
    summed = sum(w[k] * group_advantages(parts[:, k], group_size, scale=scale, eps=eps, total=total)
                 for k in range(parts.shape[1]))  # [N]
    return masked_whiten(summed, torch.ones_like(summed), total=total)  # [N]
