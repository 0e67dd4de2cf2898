"""Where gradus' update spends its time: torch's profiler over training steps, and the attention kernel A/B.

1. The `plain` workload of bench/grpo_vs_trl.py (same model, prompts, G = 8, 8 prompts, 32 new tokens, fp32),
   gradus only: `--warmup` steps, then `--steps` steps (`Trainer.train_step`, generation included) under
   `torch.profiler`; the ops with the most self CPU time, in ms per step.
2. The training forward's attention: the policy's `set_attn_implementation` alternates "sdpa" (transformers'
   default) and "eager", `--ab` steps each, in this one process; the median `time/update_s` of each. The
   two round differently, so this measures speed only.

    PYTHONPATH=src python bench/update_profile.py [--steps 5] [--warmup 2] [--ab 6] [--top 12] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo_vs_trl as workload  # noqa: E402

from gradus.logprobs import base_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload.add_arguments(ap)
    ap.add_argument("--ab", type=int, default=6, help="steps of each attention kernel, alternating")
    ap.add_argument("--top", type=int, default=12, help="ops listed")
    args = ap.parse_args(argv)
    workload.quiet()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="gradus-update-profile-") as tmp:
        wl = workload.prepare_workloads(args, Path(tmp))["plain"]
        runner = workload.GradusRunner(wl)
        for _ in range(args.warmup):
            runner.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            updates = [runner.step()["update_s"] for _ in range(args.steps)]
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
        print(f"\nTop ops by self CPU time, ms per step (mean of {args.steps} profiled steps, generation included; "
              f"update {statistics.median(updates):.3f} s a step under the profiler)\n")
        print("| op | ms per step | calls per step |")
        print("|---|---:|---:|")
        for e in ops:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / args.steps:.1f} | {e.count / args.steps:.0f} |")

        model = base_model(runner.trainer.policy)
        times: dict[str, list[float]] = {"sdpa": [], "eager": []}
        for i in range(2 * args.ab):
            kind = "sdpa" if i % 2 == 0 else "eager"
            model.set_attn_implementation(kind)
            times[kind].append(runner.step()["update_s"])
        model.set_attn_implementation("sdpa")
    sdpa, eager = statistics.median(times["sdpa"]), statistics.median(times["eager"])
    print(f"\nTraining attention, {args.ab} steps each, alternating: update s median sdpa {sdpa:.3f}, eager "
          f"{eager:.3f} (sdpa / eager {sdpa / eager:.2f}x); pairs: "
          + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(times["sdpa"], times["eager"], strict=True)))
    print(f"\n{workload.machine_line(args.threads)}")
    print(f"command: PYTHONPATH=src python bench/update_profile.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
