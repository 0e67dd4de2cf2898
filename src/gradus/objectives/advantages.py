"""Advantage estimators: group-normalised outcome rewards (GRPO family) and GAE (PPO).

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
    scores: torch.Tensor, loss_mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """PPO's per-token reward: -kl_coef * kl_t on every token, plus the outcome score on the last
    counted token of each row. scores [B], loss_mask [B, T], kl [B, T] -> [B, T]"""
    mask = loss_mask.to(torch.float32 if scores.dtype != torch.float64 else scores.dtype)
    rewards = torch.zeros_like(mask)  # [B, T]
    if kl is not None and kl_coef != 0.0:
        check_shapes("loss_mask", loss_mask, kl=kl)
        rewards = rewards - kl_coef * at_least_fp32(kl).detach().to(mask.dtype) * mask
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    last = torch.where(mask > 0, positions, -1).amax(dim=-1)  # [B] -1 for an empty row
    has_token = last >= 0  # [B]
    bonus = torch.zeros_like(mask)
    bonus[has_token, last[has_token]] = at_least_fp32(scores).to(mask.dtype)[has_token]
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
