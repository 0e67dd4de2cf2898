"""Step time of `gradus train` from two (or more) source trees, side by side: a restructuring must not slow a step.

For each algorithm, each tree runs the same short job in a fresh process (`python -m gradus train` with the
tree first on PYTHONPATH): the built-in micro model's warm start for the default task (made once, cached and
shared: every tree computes the same warm start), `run.steps` steps, no evaluation or checkpoint on the way
(20 held-out problems before and after, not timed), `run.threads` fixed. The trees alternate within each
repeat (A B, then B A), and the table gives, per tree, the median over repeats of each run's median
`time/step_seconds` after its first `--skip` steps, and the ratio to the first tree. Stage times
(`time/<stage>_s`) are shown where the tree logs them. Timings on a shared machine are noisy: compare ratios
measured in one invocation, never across invocations.

    python bench/step_time.py --src src ../old/src [--algos dapo grpo ppo] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("rollout", "score", "old_logprobs", "ref_logprobs", "advantages", "update", "sync")


def run(src: Path, algo: str, steps: int, threads: int, out: Path) -> dict[str, float]:
    """One job from `src`; the medians of its step and stage times after the first `skip` steps."""
    name = f"{algo}-{len(list(out.iterdir()))}"  # a new folder for every run
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src.resolve()), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "gradus", "train", f"algo.name={algo}", f"run.steps={steps}", "run.eval_every=0",
           "run.save_every=0", f"run.threads={threads}", f"run.out_dir={out}", f"run.name={name}", "--no-progress",
           "task.heldout_size=20"]  # the evaluations before and after are not timed: keep them short
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: it may end having learned from no token in so few steps
        raise RuntimeError(f"{src} {algo} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]


def medians(records: list[dict], skip: int) -> dict[str, float]:
    steps = [r for r in records if "time/step_seconds" in r][skip:]
    out = {"step": statistics.median(r["time/step_seconds"] for r in steps)}
    for stage in STAGES:
        values = [r[f"time/{stage}_s"] for r in steps if f"time/{stage}_s" in r]
        if values:
            out[stage] = statistics.median(values)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", nargs="+", type=Path, required=True, help="source trees (the first is the baseline)")
    parser.add_argument("--algos", nargs="+", default=["dapo", "grpo", "ppo"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the raw medians here")
    args = parser.parse_args(argv)
    found: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gradus-step-time-") as tmp:
        for repeat in range(args.repeats):
            order = args.src if repeat % 2 == 0 else list(reversed(args.src))
            for algo in args.algos:
                for src in order:
                    got = medians(run(src, algo, args.steps, args.threads, Path(tmp)), args.skip)
                    found.setdefault((algo, str(src)), []).append(got)
                    print(f"repeat {repeat + 1} {algo} {src}: {got['step']:.3f} s a step", file=sys.stderr, flush=True)
    print("| algo | source | step s (median) | vs first | " + " | ".join(f"{s} s" for s in STAGES) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(STAGES))
    table = {}
    for algo in args.algos:
        base = statistics.median(r["step"] for r in found[(algo, str(args.src[0]))])
        for src in args.src:
            runs = found[(algo, str(src))]
            step = statistics.median(r["step"] for r in runs)
            stages = [statistics.median(r[s] for r in runs) if all(s in r for r in runs) else None for s in STAGES]
            table[f"{algo} {src}"] = {"step": step, **{s: v for s, v in zip(STAGES, stages, strict=True) if v}}
            cells = " | ".join("-" if v is None else f"{v:.3f}" for v in stages)
            print(f"| {algo} | {src} | {step:.3f} | {step / base:.2f}x | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
