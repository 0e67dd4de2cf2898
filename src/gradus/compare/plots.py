"""The comparison's pictures: one line per algorithm (the mean over seeds), the seeds' range as a band.

Per-step training metrics are smoothed with a trailing moving average (the raw values are in
metrics/); held-out accuracy is drawn as measured, at each evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradus.train.plots import SMOOTH, smooth  # noqa: E402  (one smoothing for a run's plot and these)

if TYPE_CHECKING:
    from gradus.compare.data import RunData


def stack_by_step(runs: list[RunData], key: str, window: int = SMOOTH) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps logged by every run, and each run's smoothed values there -> ([n], [runs, n])."""
    curves = [dict(zip(*zip(*s, strict=True), strict=True)) for s in (r.series(key) for r in runs) if s]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    if not steps:
        return None
    values = np.array([smooth(np.array([c[s] for s in steps]), window) for c in curves])  # [runs, n]
    return np.array(steps), values


def _band(ax, x: np.ndarray, values: np.ndarray, label: str, color, marker: str | None = None) -> None:
    mean = values.mean(0)
    ax.plot(x, mean, label=label, color=color, lw=1.4, marker=marker, ms=3)
    if len(values) > 1:
        ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.18, lw=0)


def _colors(algos: list[str]) -> dict[str, tuple]:
    """A color of its own for each algorithm: tab10's up to 10 (the ones users know), tab20's up to 20, past
    that evenly spaced along turbo (tab10 repeating made DAPO and pass@k one blue in a 12-member report)."""
    n = len(algos)
    if n <= 20:
        cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
        return {a: cmap(i) for i, a in enumerate(algos)}
    cmap = plt.get_cmap("turbo")
    return {a: cmap(i / (n - 1)) for i, a in enumerate(algos)}


def _eval_arrays(runs: list[RunData]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Evaluation steps common to all runs, mean training seconds there, accuracies [runs, n]."""
    evals = [{step: (t, acc) for step, t, acc in r.evals()} for r in runs]
    evals = [e for e in evals if e]
    if not evals:
        return None
    steps = sorted(set.intersection(*(set(e) for e in evals)))
    times = np.array([[e[s][0] for s in steps] for e in evals]).mean(0)  # [n]
    accs = np.array([[e[s][1] for s in steps] for e in evals])  # [runs, n]
    return np.array(steps), times, accs


def plot_all(runs: list[RunData], algos: list[str], out: Path, target: float | None) -> list[Path]:
    done = [r for r in runs if r.summary]
    colors = _colors(algos)
    by_algo = {a: [r for r in done if r.algo == a] for a in algos}
    by_algo = {a: rs for a, rs in by_algo.items() if rs}
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algo, rs in by_algo.items():
        got = _eval_arrays(rs)
        if got:
            steps, times, accs = got
            _band(axes[0], steps, accs, algo, colors[algo], marker="o")
            _band(axes[1], times, accs, algo, colors[algo], marker="o")
    for ax, xlabel in zip(axes, ("step", "training wall time (s)"), strict=True):
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.2f}")
        ax.set(xlabel=xlabel, ylabel="held-out greedy accuracy")
    paths.append(_save(fig, axes, out / "accuracy.png", "Held-out accuracy"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algo, rs in by_algo.items():
        got = stack_by_step(rs, "reward/mean")
        if got:
            steps, values = got
            seconds = stack_by_step(rs, "time/elapsed", window=1)
            _band(axes[0], steps, values, algo, colors[algo])
            if seconds is not None and len(seconds[0]) == len(steps):
                _band(axes[1], seconds[1].mean(0), values, algo, colors[algo])
    for ax, xlabel in zip(axes, ("step", "training wall time (s)"), strict=True):
        ax.set(xlabel=xlabel, ylabel=f"mean reward ({SMOOTH}-step average)")
    paths.append(_save(fig, axes, out / "reward.png", "Training reward"))

    panels = [
        ("clip_fractions.png", "Clip fractions (GSPO: of sequences)",
         [("actor/clip_frac_low", "low (A < 0, r < 1 - eps_low)"),
          ("actor/clip_frac_high", "high (A > 0, r > 1 + eps_high)")]),
        ("entropy.png", "Policy entropy, and what drives it down",
         [("actor/entropy", "entropy (nats / token)"),
          ("actor/cov_mean", "cov(log-prob, advantage) per token")]),
        ("length.png", "Completion length", [("rollout/length_mean", "mean completion length (tokens)")]),
        ("kl_gate.png", "KL to the reference; SAPO's gate weight",
         [("actor/kl_ref", "KL to reference (per token)"), ("actor/gate_weight_mean", "SAPO mean gate weight f'(r)")]),
    ]
    # entropy against reward: collapse shows as entropy falling while the reward stops rising
    fig, axes = plt.subplots(1, 1, figsize=(5.5, 4), squeeze=False)
    for algo, rs in by_algo.items():
        reward, entropy = stack_by_step(rs, "reward/mean"), stack_by_step(rs, "actor/entropy")
        if reward and entropy and len(reward[0]) == len(entropy[0]):
            axes[0][0].plot(reward[1].mean(0), entropy[1].mean(0), color=colors[algo], label=algo, lw=1.2)
            axes[0][0].plot(reward[1].mean(0)[-1:], entropy[1].mean(0)[-1:], "o", color=colors[algo])
    axes[0][0].set(xlabel=f"mean reward ({SMOOTH}-step average)", ylabel="entropy (nats / token)")
    paths.append(_save(fig, axes[0], out / "entropy_reward.png", "Entropy against reward (dot: the end)"))

    for filename, title, keys in panels:
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
        for ax, (key, ylabel) in zip(axes[0], keys, strict=True):
            for algo, rs in by_algo.items():
                got = stack_by_step(rs, key) or (stack_by_step(rs, "actor/kl_ref_reward")
                                                 if key == "actor/kl_ref" else None)
                if got:
                    _band(ax, got[0], got[1], algo, colors[algo])
            ax.set(xlabel="step", ylabel=ylabel)
        paths.append(_save(fig, axes[0], out / filename, title))
    return paths


def _save(fig, axes, path: Path, title: str) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
