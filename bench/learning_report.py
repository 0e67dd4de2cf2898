"""The measures, tables and plot of bench/learning_vs_trl.py, from learning curves alone (no training here).

A curve is one library's run on one seed: a list of points, each a step, the training wall time up to
the end of that step (seconds, evaluation and checkpoint writes left out) and the held-out greedy accuracy
of the policy saved at that step; the first point is step 0, the warm start, at 0 s. Between two points
nothing is known: every measure below reads the points as measured and never interpolates, except the
plot's mean line and seed band, which interpolate linearly on a common time grid (said on the plot).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LIBRARIES = ("gradus", "trl")
GAIN = 0.10  # "time to +10 points": the first evaluation at least this much above the start
# accuracies are counts over the held-out set: a tolerance far below 1 / n keeps "reached" exact
_TOLERANCE = 1e-9

Point = dict[str, float]  # {"step": ..., "train_s": ..., "accuracy": ...}


def first_time_at(points: Sequence[Point], level: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy is at least `level`; None if none is."""
    for p in points:
        if p["accuracy"] >= level - _TOLERANCE:
            return p["train_s"]
    return None


def accuracy_at(points: Sequence[Point], seconds: float) -> float:
    """Accuracy of the last evaluation at or before `seconds` of training (the start when none is)."""
    reached = [p for p in points if p["train_s"] <= seconds + _TOLERANCE]
    return (reached[-1] if reached else points[0])["accuracy"]


def seed_measures(curves: dict[str, Sequence[Point]]) -> dict[str, dict[str, float | None]]:
    """Per library, the measures of one seed: its start and final accuracy, training seconds, steps, the
    time to +10 points over its own start, the time to TRL's final accuracy, and its accuracy at TRL's
    final training time (TRL's own: its final accuracy)."""
    trl = curves["trl"]
    trl_final, trl_seconds = trl[-1]["accuracy"], trl[-1]["train_s"]
    out: dict[str, dict[str, float | None]] = {}
    for lib, points in curves.items():
        start = points[0]["accuracy"]
        out[lib] = {
            "start": start,
            "final": points[-1]["accuracy"],
            "train_s": points[-1]["train_s"],
            "steps": points[-1]["step"],
            "s_per_step": points[-1]["train_s"] / max(1, points[-1]["step"]),
            "to_plus10_s": first_time_at(points, start + GAIN),
            "to_trl_final_s": first_time_at(points, trl_final),
            "acc_at_trl_end": accuracy_at(points, trl_seconds),
        }
    return out


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, min and max of the values that exist (a run that never reached a level has None), and how
    many exist of how many."""
    have = [v for v in values if v is not None]
    if not have:
        return {"mean": None, "min": None, "max": None, "n": 0, "of": len(values)}
    return {"mean": statistics.mean(have), "min": min(have), "max": max(have), "n": len(have), "of": len(values)}


MEASURES = ("start", "final", "train_s", "s_per_step", "to_plus10_s", "to_trl_final_s", "acc_at_trl_end")


def row_summary(per_seed: dict[int, dict[str, dict[str, float | None]]]) -> dict[str, dict[str, dict]]:
    """Per library and measure, the spread over the seeds that finished."""
    return {lib: {m: spread([per_seed[s][lib][m] for s in sorted(per_seed)]) for m in MEASURES}
            for lib in LIBRARIES}


def ratio_summary(per_seed: dict[int, dict[str, dict[str, float | None]]]) -> dict[str, dict]:
    """gradus' time over TRL's, seed by seed, for the two time-to measures and the whole run."""
    out = {}
    for m in ("to_plus10_s", "to_trl_final_s", "train_s"):
        ratios = []
        for s in sorted(per_seed):
            g, t = per_seed[s]["gradus"][m], per_seed[s]["trl"][m]
            ratios.append(g / t if g is not None and t else None)
        out[m] = spread(ratios)
    return out


# ---- text ----------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def _cell(s: dict, fmt: str, unit: str = "", missing: str = "not reached") -> str:
    """"mean (min–max)", with "k of n" when some seeds never got there."""
    if s["mean"] is None:
        return f"{missing} (0 of {s['of']})"
    text = f"{s['mean']:{fmt}}{unit} ({s['min']:{fmt}}–{s['max']:{fmt}})" if s["of"] > 1 else \
        f"{s['mean']:{fmt}}{unit}"
    return text + (f", {s['n']} of {s['of']}" if s["n"] < s["of"] else "")


def per_seed_table(rows: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| row | seed | library | steps | start | final | training s | s/step | time to +10 pts "
             "| time to TRL's final | acc. at TRL's end |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, per_seed in rows.items():
        for seed in sorted(per_seed):
            for lib in LIBRARIES:
                m = per_seed[seed][lib]
                lines.append(f"| {row} | {seed} | {lib} | {m['steps']:.0f} | {m['start']:.3f} | {m['final']:.3f} "
                             f"| {m['train_s']:.0f} | {m['s_per_step']:.3f} | {_num(m['to_plus10_s'], '.0f')} "
                             f"| {_num(m['to_trl_final_s'], '.0f')} | {m['acc_at_trl_end']:.3f} |")
    return lines


def summary_table(rows: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| row | library | seeds | start | final | training s | time to +10 pts (s) | time to TRL's final (s) "
             "| acc. at TRL's end |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, per_seed in rows.items():
        if not per_seed:
            continue
        summary = row_summary(per_seed)
        for lib in LIBRARIES:
            s = summary[lib]
            lines.append(f"| {row} | {lib} | {len(per_seed)} | {_cell(s['start'], '.3f')} | {_cell(s['final'], '.3f')} "
                         f"| {_cell(s['train_s'], '.0f')} | {_cell(s['to_plus10_s'], '.0f')} "
                         f"| {_cell(s['to_trl_final_s'], '.0f')} | {_cell(s['acc_at_trl_end'], '.3f')} |")
        r = ratio_summary(per_seed)
        ratio = {m: _cell(r[m], ".2f", "x", missing="no ratio") for m in r}  # a seed that did not get there, or 0 s
        lines.append(f"| {row} | gradus / TRL time | {len(per_seed)} | | | {ratio['train_s']} "
                     f"| {ratio['to_plus10_s']} | {ratio['to_trl_final_s']} | |")
    return lines


# ---- plot ----------------------------------------------------------------------------------------
def mean_band(curves: Sequence[Sequence[Point]], x: str, grid_points: int = 200) -> tuple[Any, Any, Any, Any]:
    """(grid, mean, min, max) of the curves' accuracy against `x` ("train_s" or "step"), each curve linearly
    interpolated on a grid from 0 to the shortest curve's end (so that every seed is in every point)."""
    import numpy as np

    end = min(c[-1][x] for c in curves)
    grid = np.linspace(0.0, end, grid_points)  # [g]
    ys = np.stack([np.interp(grid, [p[x] for p in c], [p["accuracy"] for p in c]) for c in curves])  # [seeds, g]
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def plot(curves: dict[str, dict[int, dict[str, list[Point]]]], path: Path) -> None:
    """Held-out accuracy against training wall time (left) and against steps (right), one row of axes per
    bench row: each seed faint, the seeds' mean as a line and their range as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in curves if curves[r]]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.2 * len(rows)), squeeze=False)
    colors = {"gradus": "C0", "trl": "C1"}
    for i, row in enumerate(rows):
        for j, (x, label) in enumerate((("train_s", "training wall time (s)"), ("step", "step"))):
            ax = axes[i][j]
            for lib in LIBRARIES:
                seeds = [curves[row][s][lib] for s in sorted(curves[row])]
                for c in seeds:
                    ax.plot([p[x] for p in c], [p["accuracy"] for p in c], color=colors[lib], alpha=0.25, lw=0.8)
                grid, mean, lo, hi = mean_band(seeds, x)
                name = "gradus" if lib == "gradus" else "TRL"
                seeds_text = f"{len(seeds)} seed" + ("s" if len(seeds) > 1 else "")
                ax.plot(grid, mean, color=colors[lib], lw=2, label=f"{name}: mean of {seeds_text}")
                if len(seeds) > 1:
                    ax.fill_between(grid, lo, hi, color=colors[lib], alpha=0.15, label=f"{name}: seed range")
            ax.set_xlabel(label)
            ax.set_ylabel("held-out greedy accuracy")
            ax.set_title(f"{row}: accuracy against {label.split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.text(0.01, 0.005, "Faint: each seed, as evaluated. Line and band: linear interpolation between "
             "evaluations, up to the shortest seed's end.", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
