"""Training speed on a shared CPU: idle against one busy process beside gradus, side by side.

For each thread policy (a fixed 2 threads, as gradus ran before; a fixed 1 thread; `auto`, the
default: `gradus.threads.ThreadGovernor` picks before each unit of work from the kernel's CPU
accounting) and each load (idle; one other process spinning on a core, as on a laptop or a shared
CI runner), a fresh process times DAPO training steps of the built-in micro model (untrained, so
every completion runs to the limit: 64 prompts x 8 samples x 16 tokens) and warm-start (SFT)
steps. The cases alternate, so slow drift of the machine hits them alike. A last table shows the
cause: one elementwise op at 1 and 2 threads.

    python bench/contention.py [--steps 5] [--sft-steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # noqa: E402  (a sibling module: bench/ is on sys.path as a script)

POLICIES = {"2 threads (before)": "2", "1 thread": "1", "auto (default)": "auto"}


def child(threads: str, steps: int, sft_steps: int) -> dict[str, float]:
    """Runs in a fresh process: median seconds of a training step and of `sft_steps` warm-start steps."""
    from gradus.config import SFTConfig, load_config
    from gradus.models import build_char_tokenizer, build_tiny_model, save_pretrained
    from gradus.tasks import get_task
    from gradus.train.sft import run_sft
    from gradus.train.trainer import Trainer

    fixed = None if threads == "auto" else int(threads)
    out = Path(tempfile.mkdtemp(prefix="gradus-contention-"))
    tokenizer = build_char_tokenizer()
    save_pretrained(build_tiny_model("micro", tokenizer=tokenizer, seed=0), tokenizer, out / "model")
    start = time.perf_counter()
    model = build_tiny_model("micro", tokenizer=tokenizer, seed=0)
    run_sft(model, tokenizer, get_task("countdown", seed=0), SFTConfig(steps=sft_steps), progress=False,
            threads=fixed)
    sft_seconds = time.perf_counter() - start
    cfg = load_config(overrides=[
        f"model.path={out / 'model'}", f"run.out_dir={out}", "run.progress=false", "task.heldout_size=8",
        "run.eval_every=0", "run.save_every=0", "algo.name=dapo",
        "rollout.prompts_per_step=64", f"run.threads={fixed or 'none'}"])
    trainer = Trainer(cfg)  # its governor picks the threads before each step (see Trainer.train_step)
    times, reduced = [], 0
    for step in range(1, steps + 2):  # the first step warms up (lazy initialisation) and is not timed
        t0 = time.perf_counter()
        metrics = trainer.train_step(step)
        if step > 1:
            times.append(time.perf_counter() - t0)
            reduced += metrics["time/threads"] < trainer.governor.max_threads
    return {"step_s": statistics.median(times), "sft_s": sft_seconds, "reduced_frac": reduced / steps}


def op_micros(threads: int, reps: int = 200) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b, c = torch.rand(1 << 17), torch.rand(1 << 17), torch.empty(1 << 17)
    torch.add(a, b, out=c)
    start = time.perf_counter()
    for _ in range(reps):
        torch.add(a, b, out=c)
    return (time.perf_counter() - start) / reps * 1e6


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_case(threads: str, busy: bool, steps: int, sft_steps: int) -> dict[str, float]:
    hog = busy_process() if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--child", threads, "--steps", str(steps),
                              "--sft-steps", str(sft_steps)], capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per case (median)")
    ap.add_argument("--sft-steps", type=int, default=20, help="warm-start steps per case (total time)")
    ap.add_argument("--repeats", type=int, default=2, help="times each case runs (the median is shown)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.sft_steps)))
        return
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; torch threads by default: "
          f"{__import__('torch').get_num_threads()}")
    results: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for busy in (False, True):
            for name, threads in POLICIES.items():
                results.setdefault((name, busy), []).append(run_case(threads, busy, args.steps, args.sft_steps))
                print(f"  done: {name}, {'busy' if busy else 'idle'}", file=sys.stderr, flush=True)

    def med(name: str, busy: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, busy)])

    print(f"\n| threads | step s, idle | step s, one busy process | busy / idle | {args.sft_steps} SFT steps s, idle "
          "| SFT, busy | busy / idle | steps with fewer threads, idle / busy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in POLICIES:
        si, sb = med(name, False, "step_s"), med(name, True, "step_s")
        fi, fb = med(name, False, "sft_s"), med(name, True, "sft_s")
        print(f"| {name} | {si:.2f} | {sb:.2f} | {sb / si:.1f}x | {fi:.1f} | {fb:.1f} | {fb / fi:.1f}x "
              f"| {med(name, False, 'reduced_frac'):.0%} / {med(name, True, 'reduced_frac'):.0%} |")
    base = med("2 threads (before)", False, "step_s")
    idle, busy = med("auto (default)", False, "step_s") / base, med("auto (default)", True, "step_s") / base
    print(f"\nauto's step against the idle 2-thread step: {idle:.2f}x idle, {busy:.2f}x beside a busy process")
    print("\n| one elementwise op on 2^17 floats | 1 thread us | 2 threads us |\n|---|---:|---:|")
    for busy in (False, True):
        hog = busy_process() if busy else None
        time.sleep(0.5 if busy else 0)
        try:
            one, two = (statistics.median(op_micros(n) for _ in range(5)) for n in (1, 2))
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        print(f"| {'one busy process' if busy else 'idle'} | {one:.0f} | {two:.0f} |")
    print(f"\n(python bench/contention.py --steps {args.steps} --sft-steps {args.sft_steps} --repeats {args.repeats})")


if __name__ == "__main__":
    main()
