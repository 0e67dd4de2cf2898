"""PNG plots of a run's curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Reward against step, and held-out accuracy against step, side by side."""
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    series = [(r["step"], r["reward/mean"]) for r in records if isinstance(r.get("reward/mean"), int | float)]
    if series:
        ax_r.plot(*zip(*series, strict=True), lw=1.2)
    ax_r.set(xlabel="step", ylabel="mean reward", title="training reward")
    evals = [(r["step"], r["eval/accuracy"]) for r in records if isinstance(r.get("eval/accuracy"), int | float)]
    if evals:
        ax_a.plot(*zip(*evals, strict=True), marker="o", lw=1.2)
    ax_a.set(xlabel="step", ylabel="held-out greedy accuracy", title="held-out accuracy", ylim=(0, 1))
    for ax in (ax_r, ax_a):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
