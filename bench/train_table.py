"""Train each algorithm with `gradus train` defaults and print the README's results table.

Run: python bench/train_table.py [--algos ppo,grpo,dapo,gspo,sapo] [-- extra key=value overrides]

Each algorithm is one `gradus train --algo A` run on the default task (built-in tiny model, SFT
warm start cached by the first run); the table is read back from each run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algos", default="ppo,grpo,dapo,gspo,sapo")
    parser.add_argument("--out", default="runs/table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for algo in args.algos.split(","):
        cmd = ["gradus", "train", "--algo", algo, "--out", args.out, "--name", algo, "--no-progress", *args.overrides]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            rows.append(f"| {algo} | failed (exit {proc.returncode}) | | | | |")
            continue
        s = json.loads((Path(args.out) / algo / "summary.json").read_text())
        gain = 100 * (s["heldout_accuracy_after"] - s["heldout_accuracy_before"])
        rows.append(f"| {algo} | {s['heldout_accuracy_before']:.3f} | {s['heldout_accuracy_after']:.3f} | {gain:+.1f} "
                    f"| {s['steps']} | {s['wall_time_s']:.0f} s | {total:.0f} s |")
        print(rows[-1], flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads default")
    print(f"command: python bench/train_table.py --algos {args.algos} {' '.join(args.overrides)}".rstrip())
    print("\n| algo | held-out acc. before | after | gain (points) | RL steps | RL wall time | whole command |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
