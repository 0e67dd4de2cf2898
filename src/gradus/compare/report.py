"""The comparison report, computed from the raw metrics in `<compare>/metrics/` alone.

One row per algorithm; each number is the mean over seeds (± the sample std when there are several).
Per-run quantities:

- held-out accuracy after training (greedy), and before (the same for every algorithm of a seed);
- steps and training wall time to reach the target: the first evaluation at or above it (the
  target is an accuracy given with --target, or by default 10 points above the run's own start)
  (evaluations happen every `run.eval_every` steps, so this is exact to that granularity);
- tokens generated over the run, mean completion length;
- clip fractions (low: A < 0 below 1 - eps_low; high: A > 0 above 1 + eps_high), mean over steps:
  a fraction of tokens, or of sequences for GSPO, whose ratio is per sequence;
- SAPO's mean gate weight f'(r) (1 on-policy, below 1 off-policy);
- the ratio's spread, mean over steps of (max - min) of pi_theta / pi_old over the step's tokens (sequences
  for GSPO);
- the rollout/training gap: the mean KL estimate (k3) between the engine's and the trainer's token
  probabilities, and for mixture-of-experts policies the share of (token, layer) pairs whose experts
  differ between the rollout and the training forward (0 under routing replay R3);
- KL to the reference, policy entropy and the covariance of token log-probability and advantage that drives
  entropy down (Cui et al. 2025), each a mean over the last tenth of the steps; tokens sampled per step;
- DAPO's dropped groups, total over the run.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gradus.compare.data import RunData, load_runs

DEFAULT_GAIN = 0.10  # without --target: time to 10 points above each run's own starting accuracy


def target_accuracy(plan: dict[str, Any]) -> float | None:
    """The plan's absolute target, or None: each run's own start + DEFAULT_GAIN (seeds start apart,
    since each seed has its own initial weights and warm start)."""
    return float(plan["target"]) if plan.get("target") is not None else None


def run_target(run: RunData, target: float | None) -> float:
    return target if target is not None else run.summary["heldout_accuracy_before"] + DEFAULT_GAIN


def run_row(run: RunData, target: float | None) -> dict[str, float | None]:
    """The per-run numbers of one report row (None where a metric does not apply)."""
    s = run.summary
    assert s is not None
    goal = run_target(run, target) - 1e-9  # accuracies are k/n: no rounding may hide a reached target
    steps = [step for step, _ in run.series("reward/mean")]
    last = max(1, len(steps) // 10)
    reached = next(((step, t) for step, t, acc in run.evals() if acc >= goal), None)
    return {
        "acc_before": s["heldout_accuracy_before"],
        "acc_after": s["heldout_accuracy_after"],
        "gain": 100 * (s["heldout_accuracy_after"] - s["heldout_accuracy_before"]),
        "steps_to_target": reached[0] if reached else None,
        "time_to_target": reached[1] if reached else None,
        "wall_time": s["wall_time_s"],
        "tokens": sum(v for _, v in run.series("rollout/tokens")) or None,
        "length": _mean(run.series("rollout/length_mean")),
        "clip_low": _mean(run.series("actor/clip_frac_low")),
        "clip_high": _mean(run.series("actor/clip_frac_high")),
        "gate": _mean(run.series("actor/gate_weight_mean")),
        "spread": _mean([(t, hi - lo) for (t, hi), (_, lo) in zip(run.series("actor/ratio_max"),
                                                                   run.series("actor/ratio_min"), strict=False)]),
        "rollout_kl": _mean(run.series("mismatch/kl_k3")),
        "routing": _mean(run.series("routing/layer_mismatch_frac")),
        "kl": _mean((run.series("actor/kl_ref") or run.series("actor/kl_ref_reward"))[-last:]),
        "entropy": _mean(run.series("actor/entropy")[-last:]),
        "cov": _mean(run.series("actor/cov_mean")[-last:]),
        "tokens_step": _mean(run.series("rollout/tokens")),
        "dropped": sum(v for _, v in run.series("dapo/groups_dropped")) if run.series("dapo/groups_dropped")
        else None,
    }


COLUMNS = [  # key, header, format
    ("acc_after", "held-out acc.", "{:.3f}"),
    ("gain", "gain (points)", "{:+.1f}"),
    ("steps_to_target", "steps to target", "{:.0f}"),
    ("time_to_target", "time to target (s)", "{:.0f}"),
    ("wall_time", "wall time (s)", "{:.0f}"),
    ("tokens", "tokens generated", "{:,.0f}"),
    ("length", "mean length", "{:.1f}"),
    ("clip_low", "clip frac. low", "{:.4f}"),
    ("clip_high", "clip frac. high", "{:.4f}"),
    ("gate", "SAPO gate", "{:.4f}"),
    ("spread", "ratio max - min", "{:.3f}"),
    ("rollout_kl", "rollout KL (k3)", "{:.1e}"),
    ("routing", "routing mismatch", "{:.4f}"),
    ("kl", "KL to ref.", "{:.4f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("cov", "cov(log p, A)", "{:.2e}"),
    ("tokens_step", "tokens / step", "{:,.0f}"),
    ("dropped", "DAPO groups dropped", "{:,.0f}"),
]


def algo_rows(plan: dict[str, Any], runs: list[RunData], target: float | None) -> list[list[str]]:
    rows = []
    for algo in plan["algos"]:
        mine = [r for r in runs if r.algo == algo]
        done = [run_row(r, target) for r in mine if r.summary]
        cells = [algo, f"{len(done)}/{len(mine)}"]
        for key, _, fmt in COLUMNS:
            values = [d[key] for d in done if d[key] is not None]
            if key in ("steps_to_target", "time_to_target") and done:
                cells.append(_cell(values, fmt) + (f" ({len(values)}/{len(done)} reached)"
                                                   if len(values) < len(done) else ""))
            else:
                cells.append(_cell(values, fmt))
        rows.append(cells)
    return rows


def write_report(compare_dir: Path) -> Path:
    """report.md and the plots, from `<compare_dir>/metrics/`."""
    from gradus.compare.plots import plot_all

    compare_dir = Path(compare_dir)
    plan, runs = load_runs(compare_dir)
    target = target_accuracy(plan)
    goal = (f"Target: held-out accuracy {target:.3f}." if target is not None else
            f"Target: {100 * DEFAULT_GAIN:.0f} points above each run's own starting accuracy.")
    header = ["algo", "runs done", *(h for _, h, _ in COLUMNS)]
    lines = [
        "# gradus compare",
        "",
        f"Algorithms: {', '.join(plan['algos'])}; seeds: {plan['seeds']}; "
        f"overrides: {' '.join(plan['overrides']) or '(none)'}.",
        f"Held-out accuracy before training: {_before(runs)}. {goal}",
        "Cells are the mean over seeds ± the sample standard deviation. Clip fractions are per token, "
        "per sequence for GSPO. KL, entropy and cov(log p, A): mean over the last tenth of the steps.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in algo_rows(plan, runs, target)]
    failed = [r for r in runs if r.summary is None]
    if failed:
        lines += ["", "Runs without a result:"]
        lines += [f"- {r.name}: {r.error or 'not finished'}" for r in failed]
    pictures = plot_all(runs, plan["algos"], compare_dir, target)
    lines += ["", "## Curves", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pictures]
    path = compare_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _before(runs: list[RunData]) -> str:
    by_seed = {r.seed: r.summary["heldout_accuracy_before"] for r in runs if r.summary}
    return ", ".join(f"{v:.3f} (seed {k})" for k, v in sorted(by_seed.items())) or "n/a"


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def _mean(series: list[tuple[int, float]]) -> float | None:
    return statistics.fmean(v for _, v in series) if series else None


