"""Slow, loop-based reference implementations of gradus.objectives, written element by element
from the papers' formulas. The tests compare the vectorised code against these."""

from __future__ import annotations

import math

import torch

from gradus.objectives import PolicyObjective


def agg_loop(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm: float | None = None) -> torch.Tensor:
    B, T = loss.shape
    rows = [[loss[i, t] for t in range(T) if mask[i, t] > 0] for i in range(B)]
    if mode == "token-mean":
        tokens = [x for row in rows for x in row]
        return sum(tokens) / max(len(tokens), 1) if tokens else loss.sum() * 0
    per_seq = []
    for row in rows:
        if not row:
            continue
        if mode == "seq-mean-token-mean":
            per_seq.append(sum(row) / len(row))
        elif mode == "seq-mean-token-sum":
            per_seq.append(sum(row))
        else:
            per_seq.append(sum(row) / (T if norm is None else norm))
    return sum(per_seq) / len(per_seq) if per_seq else loss.sum() * 0


def policy_loop(
    obj: PolicyObjective, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token losses one element at a time, then `agg_loop`."""
    B, T = logp.shape
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, T)
    out = [[logp[i, t] * 0 for t in range(T)] for i in range(B)]
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        n = len(toks)
        log_s = sum(logp[i, t] - old[i, t] for t in toks) / n if n else 0.0
        seq_adv = sum(adv[i, t] for t in toks) / n if n else 0.0
        for t in toks:
            a = adv[i, t]
            if obj.ratio == "token":
                r = torch.exp(logp[i, t] - old[i, t])
            elif obj.ratio == "sequence":
                r, a = torch.exp(log_s), seq_adv
            else:
                r = torch.exp(log_s.detach() + logp[i, t] - logp[i, t].detach())
            if obj.trust == "clip":
                clipped = min(max(r, r * 0 + 1 - obj.clip_low), r * 0 + 1 + obj.clip_high)
                loss = max(-a * r, -a * clipped)
                if obj.dual_clip is not None and a < 0:
                    loss = min(loss, -a * obj.dual_clip)
            elif obj.trust == "gate":
                tau = obj.tau_pos if a > 0 else obj.tau_neg
                loss = -a * torch.sigmoid(tau * (r - 1)) * 4 / tau
            else:
                w = r.detach().item()
                if obj.clip_low is not None:
                    w = max(w, 1 - obj.clip_low)
                w = min(w, 1 + obj.clip_high)
                loss = -w * a * logp[i, t]
            out[i][t] = loss
    loss_mat = torch.stack([torch.stack(row) for row in out])
    return agg_loop(loss_mat, mask, obj.agg, obj.agg_norm)


def group_adv_loop(rewards: list[float], g: int, scale: str, eps: float) -> list[float]:
    out = []
    batch_mean = sum(rewards) / len(rewards)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in rewards) / (len(rewards) - 1)) if len(rewards) > 1 else 0
    for k in range(0, len(rewards), g):
        grp = rewards[k : k + g]
        if max(grp) == min(grp):
            out += [0.0] * g
            continue
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
        div = {"group": std + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out += [(r - mean) / div for r in grp]
    return out


def gae_loop(rewards, values, mask, gamma, lam):
    """Textbook reverse recursion over the counted tokens of each row."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(T)):
            if mask[i, t] == 0:
                continue
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            next_adv = delta + gamma * lam * next_adv
            adv[i, t] = next_adv
            next_value = float(values[i, t])
    returns = (adv + values.double()) * mask.double()
    return adv, returns
