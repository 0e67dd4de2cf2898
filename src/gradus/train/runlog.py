"""Run logs: one JSON line of metrics per step, TensorBoard scalars, and a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# What the progress bar shows, by metric name.
BAR_FIELDS = {"reward/mean": "reward", "eval/accuracy": "acc", "rollout/tokens_per_s": "tok/s"}


class RunLogger:
    """Writes `metrics.jsonl` and TensorBoard events in the run folder; drives a progress bar."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, progress: bool = True, desc: str = ""):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self._file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True)
        self._shown: dict[str, float] = {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, step)
        for key, short in BAR_FIELDS.items():
            if isinstance(record.get(key), int | float):
                self._shown[short] = record[key]
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in self._shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
        self._tb.close()
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run rewrites the steps it repeats)."""
    records = read_metrics(path)
    if not records:
        return
    kept = [r for r in records if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value
