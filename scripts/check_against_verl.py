"""gradus.objectives against verl 0.9 on hidden random cases: every formula the two share, values and
gradients, masks and the metrics that count them. Prints one row per comparison: the largest absolute
difference over all cases, and whether it is equal (<= 1e-12 in fp64 with verl's masked_mean guard removed), or
differs only by a guard or fp32 rounding, or on purpose (and why).

Needs verl beside gradus, in a venv of its own (verl's own dependencies are not gradus'):

    python -m venv /work/scratch/venv-verl
    /work/scratch/venv-verl/bin/pip install torch==2.13.0 numpy
    /work/scratch/venv-verl/bin/pip install --no-deps verl==0.9.1   # then what its modules import
    PYTHONPATH=src /work/scratch/venv-verl/bin/python scripts/check_against_verl.py [--cases 20]

Exit status 1 when a comparison expected to be equal is not.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

import numpy as np
import torch
import verl.trainer.ppo.core_algos as va
import verl.trainer.ppo.rollout_corr_helper as vr
import verl.utils.torch_functional as vf
from verl.workers.config.actor import ActorConfig, PolicyLossConfig

import gradus.objectives as go

F64 = torch.float64
TOL = 1e-12
BIG = 1e9  # a verl bound that never binds (its vanilla loss always applies a dual clip)


class Cfg(dict):
    """verl reads its configs by attribute and by .get."""

    __getattr__ = dict.__getitem__


def actor(low, high, c=BIG, **extra):
    """verl's ActorConfig (its GSPO and SAPO check the type) with the loss knobs; the rest is what it requires."""
    policy = PolicyLossConfig(**{k: extra.pop(k) for k in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub",
                                                           "kl_cov_ratio", "ppo_kl_coef") if k in extra})
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=1, ppo_micro_batch_size_per_gpu=1,
                       clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c, policy_loss=policy,
                       **extra)


def case(seed, *, empty_rows=False, holes=False, per_token=False, spread=0.3):
    """A random batch: log-probs, old log-probs, advantages [B, T], a mask with rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(4, 10, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)  # log-probs: below 0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    if holes:
        mask = mask * (torch.rand(B, T, generator=g) > 0.2).to(F64)
        mask[:, 0] = 1.0
    if empty_rows:
        mask[0] = 0.0
    adv = torch.randn(B, 1, generator=g, dtype=F64).expand(B, T).clone()
    if per_token:
        adv = adv + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    return logp, old, adv, mask


def grad_of(fn, logp):
    x = logp.clone().requires_grad_(True)
    loss = fn(x)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


# name -> (value diff, gradient diff or None, expectation); one dict per pass (verl as shipped, guards off)
ROWS: dict[str, tuple[float, float | None, str]] = {}
EXPECT = {  # how a row may differ, and why; rows not listed must be equal
    "guard": "equal up to a 1e-8 guard verl adds inside the formula (not in masked_mean)",
    "fp32": "equal to fp32 rounding: verl computes this one in fp32",
    "purpose": "differs on purpose (docs/objectives.md)",
}


def row(name, value_diff, grad_diff=None, expect="equal"):
    ROWS[name] = (float(value_diff), None if grad_diff is None else float(grad_diff), expect)


def maxdiff(a, b, where=None):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    d = (a - b).abs()
    return float(d[where].max()) if where is not None and bool(where.any()) else float(d.max()) if d.numel() else 0.0


# ---- policy losses -----------------------------------------------------------------------------------------


def compare_loss(name, verl_mode, verl_cfg, verl_agg, algo, overrides, cases, seeded=False, expect="equal",
                 **case_kw):
    dv = dg = 0.0
    for seed in range(cases):
        logp, old, adv, mask = case(seed, **case_kw)

        def verl_loss(x, logp=logp, old=old, adv=adv, mask=mask, seed=seed):
            if seeded:
                torch.manual_seed(1000 + seed)
            return va.get_policy_loss_fn(verl_mode)(old, x, adv, mask, verl_agg, verl_cfg)[0]

        def gradus_loss(x, logp=logp, old=old, adv=adv, mask=mask, seed=seed):
            gen = torch.Generator().manual_seed(1000 + seed) if seeded else None
            return go.policy_loss(x, old, adv, mask, algo=algo, generator=gen, **overrides)[0]

        (v1, g1), (v2, g2) = grad_of(verl_loss, logp), grad_of(gradus_loss, logp)
        dv, dg = max(dv, maxdiff(v1, v2)), max(dg, maxdiff(g1, g2))
    row(name, dv, dg, expect)
    return dv, dg


def policy_losses(n):
    norm = 16.0
    compare_loss("ppo (vanilla, token-mean)", "vanilla", actor(0.2, 0.2), "token-mean", "ppo", {}, n)
    compare_loss("ppo + dual clip 3", "vanilla", actor(0.2, 0.2, 3.0), "token-mean", "ppo", {"dual_clip": 3.0}, n,
                 spread=1.0)
    compare_loss("grpo (vanilla, seq-mean-token-mean)", "vanilla", actor(0.2, 0.2), "seq-mean-token-mean", "grpo",
                 {}, n, expect="guard", empty_rows=True)
    compare_loss("dapo (vanilla 0.2/0.28)", "vanilla", actor(0.2, 0.28), "token-mean", "dapo", {}, n, per_token=True)
    compare_loss("dr_grpo (seq-mean-token-sum-norm)", "vanilla", actor(0.2, 0.2, global_batch_info={
        "loss_scale_factor": norm}), "seq-mean-token-sum-norm", "dr_grpo", {"agg_norm": norm}, n)
    compare_loss("gspo vs verl gspo (0.05/0.1)", "gspo", actor(0.05, 0.1), "seq-mean-token-mean", "gspo",
                 {"clip_low": 0.05, "clip_high": 0.1}, n, expect="guard")
    compare_loss("gspo_token vs verl gspo", "gspo", actor(0.05, 0.1), "seq-mean-token-mean", "gspo_token",
                 {"clip_low": 0.05, "clip_high": 0.1}, n, expect="guard", per_token=True)
    compare_loss("sapo", "sapo", actor(0.2, 0.2, tau_pos=1.0, tau_neg=1.05), "seq-mean-token-mean", "sapo", {}, n,
                 expect="guard", spread=1.0)
    compare_loss("cispo (r <= 5)", "cispo", actor(1.0, 4.0), "token-mean", "cispo", {}, n, spread=1.0)
    compare_loss("gmpo (geo_mean, eps 0.4)", "geo_mean", actor(0.4, 0.4), "token-mean", "gmpo", {}, n,
                 expect="guard", spread=0.5)
    compare_loss("gmpo (geo_mean, eps 0.1/0.05)", "geo_mean", actor(0.1, 0.05), "token-mean", "gmpo",
                 {"clip_low": 0.1, "clip_high": 0.05}, n, expect="guard", spread=0.5)
    for mode, low, high in (("tv", 0.15, 0.15), ("tv", 0.05, 0.02), ("kl", 0.05, 0.05), ("kl", 0.01, 0.005)):
        algo = f"dppo_{mode}"
        for cap in (None, 3.0):
            compare_loss(f"{algo} ({low}/{high}, cap {cap})", algo, actor(low, high, BIG if cap is None else cap),
                         "token-mean", algo, {"clip_low": low, "clip_high": high, "ratio_cap": cap,
                                              "agg": "token-mean"}, n, spread=0.5)
    compare_loss("clip_cov (0.2, 20% in (0.05, 2), same draw)", "clip_cov",
                 actor(0.2, 0.2, clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=2.0), "token-mean", "clip_cov",
                 {"clip_low": 0.2, "clip_high": 0.2, "cov_frac": 0.2, "cov_low": 0.05, "cov_high": 2.0}, n,
                 seeded=True, per_token=True)
    compare_loss("clip_cov (preset: eps 1, 2e-4 in (1, 5))", "clip_cov", actor(1.0, 1.0), "token-mean", "clip_cov",
                 {}, n, seeded=True, per_token=True)
    compare_loss("kl_cov (20%, beta 0.5)", "kl_cov", actor(0.2, 0.2, kl_cov_ratio=0.2, ppo_kl_coef=0.5), "token-mean",
                 "kl_cov", {"cov_frac": 0.2, "cov_coef": 0.5}, n, per_token=True)


def policy_deliberate(n):
    """Where gradus differs from verl on purpose."""
    compare_loss("gmpo with an empty row (mean over non-empty rows)", "geo_mean", actor(0.4, 0.4), "token-mean",
                 "gmpo", {}, n, expect="purpose", spread=0.5, empty_rows=True)
    # KL-Cov when every advantage is equal: verl penalises arbitrary tokens (top-k of zeros), gradus none
    dv = 0.0
    for seed in range(n):
        logp, old, _, mask = case(seed)
        adv = torch.zeros_like(logp)
        v1 = va.get_policy_loss_fn("kl_cov")(old, logp, adv, mask, "token-mean", actor(0.2, 0.2, kl_cov_ratio=0.2))[0]
        v2 = go.policy_loss(logp, old, adv, mask, algo="kl_cov", cov_frac=0.2)[0]
        dv = max(dv, maxdiff(v1, v2))
    row("kl_cov with all advantages 0 (only c_t > 0 is penalised)", dv, expect="purpose")


# ---- aggregation, KL, value loss -----------------------------------------------------------------------------


def aggregation_kl_value(n):
    d = {m: 0.0 for m in go.AGG_MODES}
    dk = {k: 0.0 for k in ("k1", "k2", "k3")}
    dvl = dvg = 0.0
    for seed in range(n):
        logp, old, adv, mask = case(seed, empty_rows=True)
        loss = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        for m in go.AGG_MODES:
            info = {"loss_scale_factor": 7.0} if m == "seq-mean-token-sum-norm" else {}
            ours = go.agg_loss(loss, mask, m, norm=7.0 if m == "seq-mean-token-sum-norm" else None)
            d[m] = max(d[m], maxdiff(va.agg_loss(loss, mask, m, **info), ours))
        for k in dk:
            dk[k] = max(dk[k], maxdiff(va.kl_penalty(logp, old, k), go.kl_penalty(logp, old, k), mask > 0))
        values, returns = logp + 0.5, old
        (v1, g1) = grad_of(lambda x, r=returns, o=old, m=mask: va.compute_value_loss(x, r, o, m, 0.2)[0], values)
        (v2, g2) = grad_of(lambda x, r=returns, o=old, m=mask: go.value_loss(x, o, r, m, clip=0.2)[0], values)
        dvl, dvg = max(dvl, maxdiff(v1, v2)), max(dvg, maxdiff(g1, g2))
    for m, v in d.items():
        row(f"agg_loss {m}", v, expect="guard" if m == "seq-mean-token-mean" else "equal")
    for k, v in dk.items():
        row(f"kl_penalty {k}", v)
    row("value_loss (clip 0.2)", dvl, dvg)


# ---- advantages -----------------------------------------------------------------------------------------------


def last_token_scores(scores, mask):
    """verl's token_level_rewards: each score on its row's last counted token."""
    out = torch.zeros_like(mask)
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)
    out[torch.arange(mask.shape[0]), last] = scores
    return out


def advantages(n):
    diffs: dict[str, float] = {}

    def note(key, value):
        diffs[key] = max(diffs.get(key, 0.0), value)

    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        G = int(torch.randint(2, 6, (1,), generator=g))
        N = G * int(torch.randint(2, 5, (1,), generator=g))
        T = int(torch.randint(3, 9, (1,), generator=g))
        mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (N,), generator=g)[:, None]).to(F64)
        scores = torch.rand(N, generator=g, dtype=F64).round(decimals=1)
        scores[:G] = 0.5  # an all-equal group
        index = np.repeat(np.arange(N // G), G)
        tlr = last_token_scores(scores, mask)
        counted = mask > 0
        for norm in (True, False):
            v = va.compute_grpo_outcome_advantage(tlr, mask, index, norm_adv_by_std_in_grpo=norm)[0]
            ours = go.group_advantages(scores, G, scale="group" if norm else "none")[:, None] * mask
            note(f"grpo (norm_adv_by_std_in_grpo={norm})", maxdiff(v, ours, counted))
        note("rloo", maxdiff(va.compute_rloo_outcome_advantage(tlr, mask, index)[0],
                             go.rloo_advantages(scores, G)[:, None] * mask, counted))
        for norm in (True, False):
            cfg = Cfg(norm_adv_by_std_in_grpo=norm)
            v = va.compute_grpo_passk_outcome_advantage(tlr, mask, index, config=cfg)[0]
            ours = go.passk_advantages(scores, G, scale="group" if norm else "none")[:, None] * mask
            note(f"grpo_passk (norm_adv_by_std_in_grpo={norm})", maxdiff(v, ours, counted))
        # the KL in the reward: verl subtracts beta * kl per token before any estimator (use_kl_in_reward)
        kl, beta = 0.1 * torch.rand(N, T, generator=g, dtype=F64), 0.05
        shaped = tlr - beta * kl * mask
        for gamma in (1.0, 0.9):
            v = va.compute_reinforce_plus_plus_outcome_advantage(shaped, mask, config=Cfg(gamma=gamma))[0]
            ours = go.reinforce_pp_advantages(go.outcome_token_rewards(scores, mask, kl, beta), mask, gamma=gamma)
            note(f"reinforce_plus_plus (gamma {gamma}, KL in reward)", maxdiff(v, ours, counted))
        v = va.compute_reinforce_plus_plus_baseline_outcome_advantage(shaped, mask, index)[0]
        ours = go.reinforce_pp_baseline_advantages(go.sequence_rewards(scores, mask, kl, beta), mask, G)
        note("reinforce_plus_plus_baseline (KL in reward)", maxdiff(v, ours, counted))
        v = va.compute_rloo_outcome_advantage(shaped, mask, index)[0]
        note("rloo (KL in reward)", maxdiff(v, go.rloo_advantages(go.sequence_rewards(scores, mask, kl, beta), G)
                                            [:, None] * mask, counted))
        values = torch.randn(N, T, generator=g, dtype=F64)
        token_rewards = torch.randn(N, T, generator=g, dtype=F64) * mask
        for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
            va_adv, va_ret = va.compute_gae_advantage_return(token_rewards, values, mask, gamma, lam)
            ours, ret = go.gae(token_rewards, values, mask, gamma=gamma, lam=lam)
            note(f"gae (gamma {gamma}, lam {lam})", max(maxdiff(va_adv, ours, counted), maxdiff(va_ret, ret, counted)))
        gdpo(g, G, N, T, mask, index, note)
    for k, v in diffs.items():
        row(f"advantage {k}", v, expect="fp32" if k.startswith("gdpo:") else "purpose" if k.startswith("gdpo ")
            else "equal")


def gdpo(g, G, N, T, mask, index, note):
    """verl's GDPO reads the parts through its reward manager's batch: build one. It casts the parts to fp32,
    so they are drawn as fp32 numbers here."""
    parts = (torch.rand(N, 3, generator=g) * 8).round().to(F64) / 8  # eighths: exact in fp32
    weights = [1.0, 0.5, 0.25]
    P = 2
    batch = {"prompts": torch.zeros(N, P), "attention_mask": torch.cat([torch.ones(N, P), mask], dim=1).long()}
    keys = ["a", "b", "c"]
    cfg = Cfg(gdpo_reward_keys=keys, gdpo_reward_weights=weights)
    non_tensor = {k: parts[:, i].numpy() for i, k in enumerate(keys)}
    v = va.compute_gdpo_outcome_advantage(torch.zeros(N, T, dtype=F64), mask, index, config=cfg,
                                          non_tensor_batch=non_tensor, batch=batch)[0]
    counted = mask > 0
    # the decoupled sum is gradus'; verl whitens it over tokens: equal after verl's own whitening step
    decoupled = sum(w * go.group_advantages(parts[:, i], G) for i, w in enumerate(weights))  # [N]
    note("gdpo: decoupled sum, then verl's token whitening", maxdiff(
        v, vf.masked_whiten(decoupled[:, None] * mask, mask) * mask, counted))
    ours = go.gdpo_advantages(parts, weights, G)[:, None] * mask
    note("gdpo (whitened over completions, not tokens)", maxdiff(v, ours, counted))


# ---- rollout correction and rejection -----------------------------------------------------------------------


ALL_ZERO: dict[str, int] = {}  # cases where a band zeroed every weight, by mode

WEIGHT_CASES = [  # (verl's rollout_is, gradus' mode, verl's threshold, gradus' low and high)
    ("token", "tis", "2.0", None, 2.0), ("token", "tis", "1.2", None, 1.2), ("token", "icepop", "0.5_5.0", 0.5, 5.0),
    ("token", "mis", "0.8_1.25", 0.8, 1.25), ("sequence", "seq_tis", "2.0", None, 2.0),
    ("sequence", "seq_tis", "1.2", None, 1.2), ("sequence", "seq_mis", "0.5_2.0", 0.5, 2.0),
    ("sequence", "seq_mis", "0.8_1.25", 0.8, 1.25),
]


def correction(n):
    diffs: dict[str, float] = {}

    def note(key, value):
        diffs[key] = max(diffs.get(key, 0.0), value)

    for seed in range(n):
        _, old, _, mask = case(seed, holes=True, empty_rows=True)
        g = torch.Generator().manual_seed(seed)
        rollout = old + 0.15 * torch.randn(old.shape, generator=g, dtype=F64) \
            + 0.1 * torch.randn(old.shape[0], 1, generator=g, dtype=F64)
        log_ratio = old - rollout
        counted = mask > 0
        for level, mode, threshold, low, high in WEIGHT_CASES:
            w_g, s_g = go.correction_weights(old, rollout, mask, mode, low=low, high=high)
            try:
                w_v, m_v = vr.compute_rollout_correction_weights(log_ratio, mask, level, threshold)
            except ZeroDivisionError:  # every weight 0: verl's ESS divides by 0, gradus' ess is 0
                assert s_g["ess"].item() == 0.0 and bool((w_g == 0).all())
                ALL_ZERO[f"{mode} [{threshold}]"] = ALL_ZERO.get(f"{mode} [{threshold}]", 0) + 1
                continue
            note(f"correction {mode} [{threshold}] vs rollout_is={level}", maxdiff(w_v, w_g, counted))
            note(f"correction {mode} [{threshold}] ess", abs(m_v["rollout_is_eff_sample_size"] - s_g["ess"].item()))
            # verl's ESS is 1 / mean((w / (mean w + 1e-8))^2): the same weights through its formula
            mean_w = w_g[counted].mean()
            guarded = 1.0 / ((w_g[counted] / (mean_w + 1e-8)) ** 2).mean()
            note(f"correction {mode} [{threshold}] ess, verl's 1e-8 in gradus' weights",
                 abs(m_v["rollout_is_eff_sample_size"] - guarded.item()))
            if mode.startswith("seq"):  # the measurement: the geometric mean is another estimator
                w_old, _ = go.correction_weights(old, rollout, mask, mode.replace("seq_", "seq_mean_"), low=low,
                                                 high=high)
                note(f"seq_mean_{mode[4:]} (the old seq_{mode[4:]}) [{threshold}] vs rollout_is=sequence "
                     "(geometric mean, not the product)", maxdiff(w_v, w_old, counted))
        rejection(old, rollout, mask, log_ratio, note)
    for k, v in diffs.items():
        expect = ("purpose" if "(geometric mean" in k or "(verl's over all rows" in k
                  else "guard" if k.endswith("] ess") else "fp32" if "verl's rescaled" in k else "equal")
        row(k, v, expect=expect)


REJECTION_CASES = [  # (verl option, its threshold, gradus Rejection)
    ("token_k1", "0.8_1.25", go.Rejection("token_k1", 0.8, 1.25)),
    ("token_k1", "0.7_1.1", go.Rejection("token_k1", 1 / 1.1, 1 / 0.7)),  # verl bounds the reciprocal ratio
    ("seq_sum_k1", "0.6_1.5", go.Rejection("seq_sum_k1", 1 / 1.5, 1 / 0.6)),
    ("seq_mean_k1", "0.95_1.05", go.Rejection("seq_mean_k1", 1 / 1.05, 1 / 0.95)),
    ("token_k2", "0.01", go.Rejection("token_k2", None, 0.01)),
    ("token_k3", "0.01", go.Rejection("token_k3", None, 0.01)),
    ("seq_sum_k2", "0.05", go.Rejection("seq_sum_k2", None, 0.05)),
    ("seq_sum_k3", "0.05", go.Rejection("seq_sum_k3", None, 0.05)),
    ("seq_mean_k2", "0.01", go.Rejection("seq_mean_k2", None, 0.01)),
    ("seq_mean_k3", "0.01", go.Rejection("seq_mean_k3", None, 0.01)),
    ("seq_max_k2", "0.03", go.Rejection("seq_max_k2", None, 0.03)),
    ("seq_max_k3", "0.03", go.Rejection("seq_max_k3", None, 0.03)),
]


def rejection(old, rollout, mask, log_ratio, note):
    counted = mask > 0
    for option, threshold, ours in REJECTION_CASES:
        mask_v, m_v = vr.compute_rollout_rejection_mask(log_ratio, mask, option, threshold)
        keep, s = go.rejection_mask(old, rollout, mask, [ours])
        key = f"rejection {option} [{threshold}]"
        note(f"{key} mask", maxdiff(mask_v, keep))
        note(f"{key} masked fraction", abs(m_v[f"rollout_rs_{option}_masked_fraction"]
                                           - s[f"{option}_rejected_frac"].item()))
        note(f"{key} seq masked fraction", abs(m_v[f"rollout_rs_{option}_seq_masked_fraction"]
                                               - s[f"{option}_seq_rejected_frac"].item()))
        sign = -1.0 if option.endswith("k1") else 1.0  # verl reports k1 = -log rho, gradus log rho
        note(f"{key} statistic mean", abs(m_v[f"rollout_rs_{option}_mean"] - sign * s[f"{option}_mean"].item()))
        if not option.endswith("k1"):
            note(f"{key} statistic max", abs(m_v[f"rollout_rs_{option}_max"] - s[f"{option}_max"].item()))
    names = ",".join(o for o, _, _ in REJECTION_CASES[2:6])
    thresholds = ",".join(t for _, t, _ in REJECTION_CASES[2:6])
    mask_v, m_v = vr.compute_rollout_rejection_mask(log_ratio, mask, names, thresholds)
    keep, s = go.rejection_mask(old, rollout, mask, [c for _, _, c in REJECTION_CASES[2:6]])
    note("rejection combined (4 criteria) mask", maxdiff(mask_v, keep))
    note("rejection combined masked fraction", abs(m_v["rollout_rs_masked_fraction"] - s["rejected_frac"].item()))
    note("rejection combined seq fraction (verl's over all rows, gradus' over non-empty ones)",
         abs(m_v["rollout_rs_seq_masked_fraction"] - s["seq_rejected_frac"].item()))
    verl_seq = m_v["rollout_rs_seq_masked_fraction"] * mask.shape[0] / max(int((mask.sum(-1) > 0).sum()), 1)
    note("rejection combined seq fraction, verl's rescaled to non-empty rows",
         abs(verl_seq - s["seq_rejected_frac"].item()))
    note("seq_mean_mis band vs seq_mean_k1 rejection (same rows kept)", maxdiff(
        vr.compute_rollout_rejection_mask(log_ratio, mask, "seq_mean_k1", "0.8_1.25")[0],
        (go.correction_weights(old, rollout, mask, "seq_mean_mis", low=0.8, high=1.25)[0] > 0).to(F64), counted))


# ---- report ---------------------------------------------------------------------------------------------------


def exact_masked_mean(values, mask, axis=None):
    """verl's masked_mean without its 1e-8 in the denominator (0 where nothing is counted)."""
    n = mask.sum(axis) if axis is not None else mask.sum()
    total = (values * mask).sum(axis) if axis is not None else (values * mask).sum()
    return torch.where(n > 0, total / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(total))


def run(cases: int) -> dict[str, tuple[float, float | None, str]]:
    ROWS.clear()
    ALL_ZERO.clear()
    for part in (policy_losses, policy_deliberate, aggregation_kl_value, advantages, correction):
        part(cases)
    return dict(ROWS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="random cases per comparison")
    args = parser.parse_args()
    torch.set_default_dtype(F64)
    shipped = run(args.cases)
    stock = vf.masked_mean
    vf.masked_mean = exact_masked_mean  # every verl module reads it through verl.utils.torch_functional
    try:
        exact = run(args.cases)
    finally:
        vf.masked_mean = stock
    print(f"verl {version('verl')}, torch {torch.__version__}, numpy {np.__version__}; {args.cases} random cases "
          f"per row, fp64. Columns: max |gradus - verl| of values and gradients, with verl as shipped and with its "
          f"masked_mean's 1e-8 guard removed; equal: <= {TOL:g} without the guard.")
    width = max(len(k) for k in shipped)
    print(f"{'comparison'.ljust(width)}  {'value':>8} {'grad':>8}  {'no guard':>8} {'grad':>8}  verdict")
    bad = 0
    for name, (dv, dg, expect) in shipped.items():
        ev, eg, _ = exact[name]
        worst = max(ev, eg or 0.0)
        if expect == "equal":
            verdict = "equal" if worst <= TOL else "NOT EQUAL"
        elif expect == "guard":
            verdict = EXPECT[expect] if worst <= 1e-7 else "NOT EQUAL"
        elif expect == "fp32":
            verdict = EXPECT[expect] if worst <= 1e-6 else "NOT EQUAL"
        else:
            verdict = EXPECT[expect]
        bad += verdict == "NOT EQUAL"
        cells = [f"{x:8.1e}" if x is not None else f"{'-':>8}" for x in (dv, dg, ev, eg)]
        print(f"{name.ljust(width)}  {cells[0]} {cells[1]}  {cells[2]} {cells[3]}  {verdict}")
    for what, count in ALL_ZERO.items():
        print(f"{what}: {count} case(s) with every weight 0, where verl's ESS raises ZeroDivisionError and gradus' "
              "ess is 0 (the weights are compared in the other cases)")
    print(f"{len(shipped)} comparisons, {bad} not equal that should be")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
