"""Train each algorithm with `gradus train` defaults over several seeds; print the README's results table.

Run: python bench/train_table.py [--algos ppo,grpo,dapo,gspo,sapo] [--seeds 5] [--jobs 2] [key=value ...]

Each (algorithm, seed) is one `gradus train --algo A run.seed=S` on the default task; every seed has its
own SFT warm start (made by the first algorithm's run, cached for the others). Gains are read back from each run's
summary.json. A run whose summary.json is already in --out is reused, not re-run, and one that was interrupted
is resumed from its newest checkpoint, so a table continues where it stopped (delete --out to measure
afresh; never run two tables on one --out at once). A run is reused or resumed only when its config.yaml is
what this table would run now (gradus' defaults and the overrides); one that differs is a failed row that
names the keys. With --jobs 2 two runs go side by
side, one CPU thread each: the gains are the same as alone (parameters are bit-identical across thread
counts, tests/test_threads.py), the wall times are not the ones a run alone takes.
Writes --out/table.md and --out/table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import cpu_model  # bench/ is on sys.path when a bench script runs

# Keys that may differ between a run kept in --out and this table without making it another run.
_SAME_RUN_IGNORES = ("run.threads", "run.progress", "run.out_dir", "run.cache_dir")


def config_drift(run_dir: Path, algo: str, seed: int, overrides: list[str]) -> list[str]:
    """The keys (with both values) in which `run_dir`'s config.yaml differs from the run this table would
    start now; empty when it is that run."""
    from gradus.algorithm import resolved_config
    from gradus.config import all_keys, get_key, load_config

    saved = load_config(run_dir / "config.yaml")
    want = resolved_config(load_config(overrides=[f"algo.name={algo}", f"run.seed={seed}", f"run.name={run_dir.name}",
                                                  *overrides]))
    return [f"{key} (kept {get_key(saved, key)!r}, now {get_key(want, key)!r})" for key in all_keys()
            if key not in _SAME_RUN_IGNORES and get_key(saved, key) != get_key(want, key)]


def run_one(algo: str, seed: int, args: argparse.Namespace) -> dict:
    """One `gradus train` run (or its summary when it already finished); the row of the per-run table."""
    name = f"{algo}-seed{seed}"
    summary_path = Path(args.out) / name / "summary.json"
    total = None
    if (Path(args.out) / name / "config.yaml").is_file():
        drift = config_drift(Path(args.out) / name, algo, seed, args.overrides)
        if drift:
            print(f"{name}: the run kept in {Path(args.out) / name} is not the one this table runs: "
                  f"{'; '.join(drift)}. Delete that folder (or use another --out) to measure it afresh",
                  file=sys.stderr, flush=True)
            return {"algo": algo, "seed": seed, "failed": "config differs: " + "; ".join(drift)}
    if not summary_path.exists():
        threads = ["run.threads=1"] if args.jobs > 1 else []
        run_dir = Path(args.out) / name
        if any(run_dir.glob("checkpoints/step-*")):  # an interrupted run: continue it, at this table's threads
            cmd = ["gradus", "train", "--resume", str(run_dir), "--no-progress", *(threads or ["run.threads=none"])]
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # stopped before its first checkpoint: start it again
            cmd = ["gradus", "train", "--algo", algo, "--out", args.out, "--name", name, "--no-progress",
                   f"run.seed={seed}", *threads, *args.overrides]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
            return {"algo": algo, "seed": seed, "failed": proc.returncode}
    try:
        s = json.loads(summary_path.read_text())
    except (OSError, ValueError) as err:  # e.g. run.out_dir or run.name given as overrides
        print(f"{name}: no readable {summary_path}: {err}", file=sys.stderr, flush=True)
        return {"algo": algo, "seed": seed, "failed": "no summary.json"}
    row = {"algo": algo, "seed": seed, "before": s["heldout_accuracy_before"], "after": s["heldout_accuracy_after"],
           "gain": 100 * (s["heldout_accuracy_after"] - s["heldout_accuracy_before"]), "steps": s["steps"],
           "rl_wall_s": s["wall_time_s"], "command_s": total}
    print(f"{name}: {row['before']:.3f} -> {row['after']:.3f} ({row['gain']:+.1f}), RL {row['rl_wall_s']:.0f} s"
          + ("" if total is None else f", command {total:.0f} s") + ("" if total is not None else " (reused)"),
          flush=True)
    return row


def summarize(algos: list[str], rows: list[dict]) -> list[str]:
    """Markdown rows: per algorithm, the runs done, their steps, mean start, mean end, and the gain's mean, min
    and max."""
    lines = ["| algo | seeds | steps | held-out acc. before (mean) | after (mean) | gain mean | gain min | gain max "
             "| RL wall time (median) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for algo in algos:
        done = [r for r in rows if r["algo"] == algo and "gain" in r]
        failed = sum(1 for r in rows if r["algo"] == algo and "failed" in r)
        if not done:
            lines.append(f"| {algo} | 0 done, {failed} failed | | | | | | | |")
            continue
        gains = [r["gain"] for r in done]
        seeds = f"{len(done)}" + (f" ({failed} failed)" if failed else "")
        steps = sorted({r["steps"] for r in done})  # one value unless runs were stopped early
        lines.append(f"| {algo} | {seeds} | {'/'.join(map(str, steps))} "
                     f"| {statistics.mean(r['before'] for r in done):.3f} "
                     f"| {statistics.mean(r['after'] for r in done):.3f} | {statistics.mean(gains):+.1f} "
                     f"| {min(gains):+.1f} | {max(gains):+.1f} "
                     f"| {statistics.median(r['rl_wall_s'] for r in done):.0f} s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default="ppo,grpo,dapo,gspo,sapo")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                        help="runs side by side, one thread each when 2 (default %(default)s)")
    parser.add_argument("--out", default="runs/table")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.jobs > args.seeds:  # two runs of one seed at once would both build its warm start
        parser.error(f"--jobs {args.jobs} needs --seeds {args.jobs} or more")
    if any(o.split("=", 1)[0] in ("run.out_dir", "run.name", "run.seed") for o in args.overrides):
        parser.error("run.out_dir, run.name and run.seed are set by the table (use --out, --seeds)")
    algos = args.algos.split(",")
    # algorithm-major: runs side by side have different seeds (each seed's warm start is made once, by the
    # first algorithm's run, and cached for the others, which start after it)
    plan = [(algo, seed) for algo in algos for seed in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args), plan))
    command = (f"python bench/train_table.py --algos {args.algos} --seeds {args.seeds} --jobs {args.jobs} "
               f"{' '.join(args.overrides)}").rstrip()
    machine = f"{cpu_model()}, {os.cpu_count()} cores" + (", two runs side by side, 1 thread each"
                                                           if args.jobs > 1 else ", one run at a time")
    table = summarize(algos, rows)
    text = "\n".join([f"machine: {machine}", f"command: {command}", "", *table])
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps({"machine": machine, "command": command, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
