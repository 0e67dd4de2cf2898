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
    obj: PolicyObjective, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
    seed: int | None = None,
) -> torch.Tensor:
    """Per-token losses one element at a time, then `agg_loop`. `seed`: of Clip-Cov's draw (None: the global
    generator), reproduced as its spec says: torch.randperm over the candidates in row-major order."""
    B, T = logp.shape
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, T)
    if obj.ratio == "geometric":
        return agg_loop(_gmpo_loop(obj, logp, old, adv, mask), mask, obj.agg, obj.agg_norm)
    if obj.trust in ("tv", "binary_kl", "clip_cov", "kl_cov"):
        return agg_loop(_token_loop(obj, logp, old, adv, mask, seed), mask, obj.agg, obj.agg_norm)
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


def _gmpo_loop(obj, logp, old, adv, mask):
    """GMPO: per sequence, exp of the mean of one-sided clipped token log-ratios, times -A."""
    B, T = logp.shape
    out = [[logp[i, t] * 0 for t in range(T)] for i in range(B)]
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        if not toks:
            continue
        a = sum(adv[i, t] for t in toks) / len(toks)
        clipped = []
        for t in toks:
            x = logp[i, t] - old[i, t]
            if a > 0:
                clipped.append(x if x < obj.clip_high else x * 0 + obj.clip_high)
            else:
                clipped.append(x if x > -obj.clip_low else x * 0 - obj.clip_low)
        loss = -a * torch.exp(sum(clipped) / len(toks))
        for t in toks:
            out[i][t] = loss
    return torch.stack([torch.stack(row) for row in out])


def _covariances(logp, adv, mask):
    """c_t by the definition, in Python floats: {(i, t): c}."""
    toks = [(i, t) for i in range(logp.shape[0]) for t in range(logp.shape[1]) if mask[i, t] > 0]
    lp = {p: logp[p].item() for p in toks}
    a = {p: adv[p].item() for p in toks}
    mean_lp, mean_a = sum(lp.values()) / len(toks), sum(a.values()) / len(toks)
    return {p: (lp[p] - mean_lp) * (a[p] - mean_a) for p in toks}


def _token_loop(obj, logp, old, adv, mask, seed):
    """DPPO, Clip-Cov and KL-Cov, token by token."""
    B, T = logp.shape
    out = [[logp[i, t] * 0 for t in range(T)] for i in range(B)]
    toks = [(i, t) for i in range(B) for t in range(T) if mask[i, t] > 0]
    k = max(int(obj.cov_frac * len(toks)), 1) if obj.cov_frac is not None else 0
    cov = _covariances(logp, adv, mask) if toks and obj.cov_frac is not None else {}
    chosen = set()
    if obj.trust == "kl_cov":  # the k largest positive covariances
        chosen = set(sorted((p for p in toks if cov[p] > 0), key=lambda p: -cov[p])[:k])
    candidates = []  # Clip-Cov's, in row-major order
    for i, t in toks:
        a, x = adv[i, t], logp[i, t] - old[i, t]
        r = torch.exp(x)
        if obj.trust in ("tv", "binary_kl"):
            p, p_old = math.exp(logp[i, t].item()), math.exp(old[i, t].item())
            if obj.trust == "tv":
                up, down = p - p_old > obj.clip_high, p - p_old < -obj.clip_low
            else:
                d = p_old * math.log(p_old / p) + (1 - p_old) * math.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
                up, down = d > obj.clip_high and p > p_old, d > obj.clip_low and p < p_old
            valid = not (up if a > 0 else down)
            w = r.item() if obj.ratio_cap is None else min(r.item(), obj.ratio_cap)
            out[i][t] = -a * w * logp[i, t] if valid else logp[i, t] * 0
        elif obj.trust == "kl_cov":
            out[i][t] = -a * r + (obj.cov_coef * abs(x) if (i, t) in chosen else 0)
        else:
            unclipped = -a * r
            clipped = -a * min(max(r, r * 0 + 1 - obj.clip_low), r * 0 + 1 + obj.clip_high)
            out[i][t] = max(unclipped, clipped)
            if not clipped > unclipped and obj.cov_low < cov[(i, t)] < obj.cov_high:
                candidates.append((i, t))
    if candidates:  # Clip-Cov: k of them, drawn as its spec says, lose loss and gradient
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for j in torch.randperm(len(candidates), generator=g)[:k].tolist():
            i, t = candidates[j]
            out[i][t] = logp[i, t] * 0
    return torch.stack([torch.stack([x if torch.is_tensor(x) else logp[0, 0] * 0 + x for x in row]) for row in out])


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
