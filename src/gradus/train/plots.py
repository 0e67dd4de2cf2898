"""PNG plots of a run's curves (matplotlib, headless).

Per-step reward comes from a few prompts, so it is noisy: it is drawn as faint points under a trailing
moving average. Held-out accuracy is drawn as measured. Each axis spans its data with a small margin
rather than a fixed 0 to 1, so that a gain from 0.19 to 0.32 reads as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SMOOTH = 10  # steps in the moving average of per-step curves


def smooth(values: Sequence[float] | np.ndarray, window: int = SMOOTH) -> np.ndarray:
    """Trailing moving average; the first points average what there is so far."""
    csum = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))  # [n + 1]
    idx = np.arange(1, len(values) + 1)  # [n]
    lo = np.maximum(idx - window, 0)  # [n]
    return (csum[idx] - csum[lo]) / (idx - lo)  # [n]


def fit_limits(values: Sequence[float], margin: float = 0.08) -> tuple[float, float]:
    """An axis range holding every value, with `margin` of their span on each side; a flat series gets
    +-0.05 (scaled up for large values) so that it does not lie on an edge."""
    lo, hi = float(min(values)), float(max(values))
    pad = margin * (hi - lo) if hi > lo else 0.05 * max(1.0, abs(hi))
    return lo - pad, hi + pad


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def draw_run(records: list[dict[str, Any]], title: str = "") -> Figure:
    """Reward against step (raw and smoothed), and held-out accuracy against step, side by side."""
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, rewards = _series(records, "reward/mean")
    if rewards:
        ax_r.scatter(steps, rewards, s=7, alpha=0.3, color="tab:blue", lw=0, label="per step")
        ax_r.plot(steps, smooth(rewards), color="tab:blue", lw=1.6, label=f"{SMOOTH}-step trailing mean")
        ax_r.set_ylim(fit_limits(rewards))
        ax_r.legend(fontsize=8)
    ax_r.set(xlabel="step", ylabel="mean reward", title="training reward")
    steps, accs = _series(records, "eval/accuracy")
    if accs:
        ax_a.plot(steps, accs, marker="o", lw=1.2, color="tab:green",
                  label=f"{accs[0]:.3f} at step {steps[0]} → {accs[-1]:.3f} at step {steps[-1]}")
        ax_a.set_ylim(fit_limits(accs))
        ax_a.legend(fontsize=8)
    ax_a.set(xlabel="step", ylabel="held-out greedy accuracy", title="held-out accuracy")
    for ax in (ax_r, ax_a):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Write `draw_run`'s figure to `out` (PNG)."""
    fig = draw_run(records, title)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
