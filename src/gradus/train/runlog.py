"""Run logs: one JSON line of metrics per step, TensorBoard scalars, and a progress bar.

`metrics.jsonl` holds, in order: the step-0 evaluation, one line per step (with the periodic
evaluation merged in), and a line of only `eval/*` values at the last step for the final
evaluation. A resumed run first cuts the file back to its checkpoint's step (see truncate_metrics),
so every line appears once whatever point the previous process was killed at.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gradus.train.durable import DiskFull, is_disk_full, replace_text

# What the progress bar shows, by metric name.
BAR_FIELDS = {"reward/mean": "reward", "eval/accuracy": "acc", "rollout/tokens_per_s": "tok/s"}


class NullLogger:
    """What ranks other than 0 log to under torchrun: nothing (rank 0 writes the run's files)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def advance(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    """Writes `metrics.jsonl` and TensorBoard events in the run folder; drives a progress bar."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, fresh: bool = False,
                 progress: bool = True, desc: str = ""):
        """`fresh`: a new run (no step-0 evaluation yet), whose folder may hold an older run's lines."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        truncate_metrics(self.path, -1 if fresh else start_step)
        self._file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True)
        self._shown: dict[str, float] = {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            if is_disk_full(err, self.run_dir):
                raise DiskFull("metrics", self.path) from err
            raise
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
    """The records of a metrics file (or of its gzipped copy, `<path>.gz`, as a compare report keeps them). A
    last line cut short by a kill is left out."""
    path = Path(path)
    packed = path.with_name(path.name + ".gz")
    if not path.is_file() and packed.is_file():
        text = gzip.decompress(packed.read_bytes()).decode()
    elif path.is_file():
        text = path.read_text()
    else:
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return records


def write_summary(run_dir: Path, fields: dict[str, Any], *, title: str) -> dict[str, Any]:
    """summary.json: `fields` with the mean reward of the last 10 steps; and curves.png of metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in records if isinstance(r.get("reward/mean"), int | float)]
    tail = rewards[-10:]
    summary = {**fields, "final_reward": sum(tail) / len(tail) if tail else None, "run_dir": str(run_dir)}
    replace_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    from gradus.train.plots import plot_run  # matplotlib costs ~25 MiB: only imported when a run ends

    plot_run(records, run_dir / "curves.png", title=title)
    return summary


def truncate_metrics(path: Path, last_step: int) -> None:
    """Cut the file back to what a run resumed at `last_step` has already logged: the lines up to that
    step, less a final evaluation logged there (the resumed run logs its own). -1: remove every line."""
    path = Path(path)
    if not path.is_file():
        return
    records = read_metrics(path)
    kept = [r for r in records if r.get("step", 0) < last_step
            or (r.get("step", 0) == last_step and not (last_step > 0 and _is_final_eval(r)))]
    replace_text(path, "".join(json.dumps(r) + "\n" for r in kept), what="metrics")


def _is_final_eval(record: dict[str, Any]) -> bool:
    """A line of only evaluation values past step 0 is the final evaluation (the periodic ones share the
    line of their step)."""
    return all(k == "step" or k.startswith("eval/") for k in record)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value
