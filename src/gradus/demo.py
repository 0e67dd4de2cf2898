"""A one-minute demonstration of the objectives on a toy problem, no language model needed.

The "policy" is a table of logits over a vocabulary of V tokens, the same at every position. A
completion is T tokens sampled from it; its reward is the fraction of tokens equal to token 0.
Each algorithm samples groups, computes group advantages and takes a few clipped (or gated)
updates per batch, exactly as a trainer would, through `gradus.objectives`.
"""

from __future__ import annotations

import time

import torch

from gradus.objectives import group_advantages, policy_loss

V, T, GROUP, PROMPTS = 8, 6, 8, 4
STEPS = 30  # training steps per algorithm, unless told


def run_toy(algo: str, *, steps: int = STEPS, lr: float = 0.5, seed: int = 0) -> tuple[float, float]:
    """Train the toy policy with `algo`; return (expected reward before, after)."""
    torch.manual_seed(seed)
    logits = torch.zeros(V, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    before = torch.softmax(logits, -1)[0].item()
    n = GROUP * PROMPTS
    for _ in range(steps):
        with torch.no_grad():
            tokens = torch.multinomial(torch.softmax(logits, -1), n * T, replacement=True).view(n, T)  # [N, T]
            old_logp = torch.log_softmax(logits, -1)[tokens]  # [N, T]
        rewards = (tokens == 0).float().mean(-1)  # [N]
        adv = group_advantages(rewards, GROUP, scale="none" if algo == "dr_grpo" else "group")  # [N]
        mask = torch.ones(n, T)
        for _ in range(2):  # two updates per batch: the second is off-policy, so the trust region acts
            logp = torch.log_softmax(logits, -1)[tokens]  # [N, T]
            loss, _ = policy_loss(logp, old_logp, adv, mask, algo=algo)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return before, torch.softmax(logits, -1)[0].item()


def main(algos: list[str], steps: int) -> None:
    print(f"toy problem: reward = fraction of {T} sampled tokens equal to token 0 (chance 1/{V})")
    print(f"| algo | P(token 0) before | after {steps} steps | seconds |")
    print("| --- | --- | --- | --- |")
    for algo in algos:
        start = time.perf_counter()
        before, after = run_toy(algo, steps=steps)
        print(f"| {algo} | {before:.3f} | {after:.3f} | {time.perf_counter() - start:.2f} |")
