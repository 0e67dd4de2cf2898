"""A finished (or failed) run of a comparison as its report reads it: the metrics copied into `<compare>/metrics/`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradus.compare.jobs import run_name
from gradus.train.runlog import read_metrics


@dataclass
class RunData:
    name: str
    algo: str
    seed: int
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None  # None: the run failed or has not finished
    error: str | None = None

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every step record holding a finite number under `key`."""
        return [(r["step"], float(r[key])) for r in self.records
                if r.get("step", 0) > 0 and is_number(r.get(key))]

    def evals(self) -> list[tuple[int, float, float]]:
        """(step, training seconds so far, held-out accuracy), the start and the end included."""
        out, elapsed = [], 0.0
        for r in self.records:
            elapsed = float(r.get("time/elapsed", elapsed))
            if is_number(r.get("eval/accuracy")):
                out.append((r["step"], elapsed, float(r["eval/accuracy"])))
        if self.summary and out:  # the final evaluation is logged after the last step's record
            out[-1] = (out[-1][0], float(self.summary["wall_time_s"]), out[-1][2])
        return out


def load_runs(compare_dir: Path) -> tuple[dict[str, Any], list[RunData]]:
    compare_dir = Path(compare_dir)
    plan = json.loads((compare_dir / "compare.json").read_text())
    metrics = compare_dir / "metrics"
    runs = []
    for seed in range(plan["seeds"]):
        for algo in plan["algos"]:
            name = run_name(algo, seed)
            summary_path, error_path = metrics / f"{name}.summary.json", metrics / f"{name}.error.txt"
            runs.append(RunData(
                name, algo, seed, read_metrics(metrics / f"{name}.jsonl"),
                json.loads(summary_path.read_text()) if summary_path.is_file() else None,
                error_path.read_text().strip().splitlines()[-1] if error_path.is_file() else None))
    return plan, runs




def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
