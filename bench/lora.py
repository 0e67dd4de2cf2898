"""LoRA against full fine-tuning: peak memory and step time of a GRPO step, `model.lora_r` = 0, 8, 32.

How: for each (model size, rank) a fresh process (this file with `--child`) builds the same `Trainer` that
`gradus train` builds and times `Trainer.train_step` itself, so the numbers are those of a real run:

1. The model: a built-in tiny Qwen2 of each `--sizes` (gradus.models.TINY_SIZES; micro 0.82M, small
   4.8M parameters), untrained (seed 0, written once to a temp folder and passed as `model.path`), so no
   warm start is made or measured. An untrained model almost never samples EOS, so every completion runs
   to the limit and every step has the same shapes: 64 prompts x G=8 = 512 completions x 16 tokens.
2. GRPO defaults (KL to the reference at 0.04, so full fine-tuning keeps a frozen reference copy; under
   LoRA the reference is the policy with its adapter off, no copy), AdamW, fp32, `run.threads` = 2
   (pinned: the default follows the load, which would mix the machine's load into the comparison).
   LoRA: `model.lora_r` = r, alpha 32, adapters on q, k, v, o, gate, up, down (gradus' defaults).
3. Memory, three ways:
   - `state MiB`: the training state's tensors, counted exactly from the trainer after the steps: the
     policy's weights, the reference copy, the engine's sampling copy (LoRA), a gradient for every trainable
     weight, AdamW's two moments (`of which AdamW`). This is what LoRA shrinks.
   - `peak RSS MiB`: the process's resident-memory high-water mark during the timed steps. It is reset
     (/proc/self/clear_refs, 5) once the trainer is built, so start-up transients are not in it;
     `step MiB` = peak - RSS before the first step. RSS is what the machine must have, but it includes
     what the allocator (glibc malloc) keeps after torch frees it, so it moves by a few hundred MiB from
     one identical process to the next; the repeats' median is shown. (Measured once on micro, 2 threads:
     with MALLOC_MMAP_THRESHOLD_=131072, which makes glibc return large blocks at once, `step MiB` fell
     from 994 to 806 (full) and from 1384 to 734 (r=8), close to `torch step MiB`, and steps took 2x
     as long: the LoRA excess in RSS is the allocator's fragmentation, not torch's tensors.)
     A second table splits it: the largest RSS growth within one call of sampling (`engine.generate`),
     of the passes before the update (`Trainer.prepare`: advantages, old and reference log-probs) and
     of the update (`run_updates`), measured by wrapping those three calls in the child (nothing else
     is changed).
   - `torch step MiB`: the most bytes torch itself held at once during one more (untimed) step, above what
     it held before that step, summed from the allocation and free events of torch's profiler
     (`profile_memory=True`): activations, temporaries and gradients, without the allocator's slack.
   The reward workers are separate processes and not included.
4. Time: the median of `train_step` wall time over the steps after the first (the first warms up lazy
   initialisation and creates the optimizer state), split into sampling (`rollout/gen_seconds`) and the
   rest (scoring, the log-prob passes, the update); then the median over `--repeats` processes per case,
   run interleaved (0 8 32, 32 8 0), never two at once. Under LoRA the local engine samples from a merged
   copy of the policy (a plain model, refreshed after every update), so the fast decoder runs it (`fast
   decoder` column); the copy's weights are in `state MiB`.
5. Load: before each process the bench waits (up to `--max-wait` s) until other work uses < 0.3 cores; the
   child reads the kernel's CPU accounting around every step (gradus.threads.read_sample: idle time, its
   own and its reward workers' CPU time), and the step medians are over the steps during which other work
   took < 0.3 cores (`quiet steps`), or over all of a process's steps when none was quiet.

    python bench/lora.py [--sizes micro small] [--ranks 0 8 32] [--steps 4] [--repeats 2] [--max-wait 120] \\
        [--json bench/results/lora.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_parallel import (  # noqa: E402
    QUIET_CORES,
    children_cpu_seconds,
    cpu_busy_seconds,
    loadavg,
    wait_for_quiet,
)
from machine import cpu_model  # noqa: E402

MIB = 1 << 20


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Set the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def tensor_mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def state_mib(trainer) -> dict[str, float]:
    """The training state's tensors, by part (MiB): weights, reference copy, the engine's sampling copy,
    gradients, optimizer state."""
    import torch

    params = list(trainer.policy.parameters())
    trainable = [p for p in params if p.requires_grad]
    reference = trainer.actor.reference_copy
    copy = trainer.engine.model if trainer.engine.holds_weights else None  # LoRA: the merged copy it samples from
    opt_state = [v for s in trainer.actor.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
    return {"weights": tensor_mib(params), "reference": tensor_mib(reference.parameters()) if reference else 0.0,
            "sampling_copy": tensor_mib(copy.parameters()) if copy is not None else 0.0,
            "grads": tensor_mib(trainable), "optimizer": tensor_mib(opt_state),
            "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable)}


class PhasePeaks:
    """Wraps a function so that each call resets the RSS high-water mark first and records, per phase, the
    largest RSS reached above the RSS at the call's start (MiB) and the largest RSS reached."""

    def __init__(self):
        self.growth: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = rss_mib()
            reset_peak_rss()
            try:
                return fn(*args, **kwargs)
            finally:
                peak = peak_rss_mib()
                self.growth[name] = max(self.growth.get(name, 0.0), peak - start)
                self.peak[name] = max(self.peak.get(name, 0.0), peak)
        return timed


def profiled_peak_mib(fn) -> float:
    """The most bytes torch held allocated at once during `fn()` beyond what it held before (MiB), summed
    from the allocation and free events of torch's profiler (`profile_memory=True`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()  # + for an allocation, - for a free
        peak = max(peak, held)
    return peak / MIB


def child(model_dir: str, rank: int, steps: int, threads: int) -> dict:
    """Runs in a fresh process: build the trainer, time `steps` training steps, measure memory and load."""
    import gradus.train.trainer as trainer_module
    from gradus.config import load_config
    from gradus.threads import ours_between, read_sample
    from gradus.train.trainer import Trainer

    out = tempfile.mkdtemp(prefix="gradus-lora-bench-")
    cfg = load_config(overrides=[
        f"model.path={model_dir}", f"model.lora_r={rank}", f"run.out_dir={out}", "run.name=bench",
        "run.progress=false", "task.heldout_size=8", "run.eval_every=0", "run.save_every=0",
        "algo.name=grpo", "rollout.prompts_per_step=64", f"run.threads={threads}", f"run.steps={steps + 1}"])
    trainer = Trainer(cfg)
    # where the memory goes: sampling, the passes before the update (advantages, old and reference log-probs)
    # and the update; measured by wrapping the three calls of Trainer.train_step (nothing else is changed)
    phases = PhasePeaks()
    trainer.engine.generate = phases.wrap("sample", trainer.engine.generate)
    trainer.prepare = phases.wrap("prepare", trainer.prepare)
    trainer_module.run_updates = phases.wrap("update", trainer_module.run_updates)
    helpers = trainer.rollout.pids
    built = rss_mib()
    reset_peak_rss()
    rows = []
    for step in range(1, steps + 1):
        before = read_sample(helpers())
        t0 = time.perf_counter()
        metrics = trainer.train_step(step)
        wall = time.perf_counter() - t0
        after = read_sample(helpers())
        # cores other work kept busy: every core's time, less the idle time, less ours (this process + reward workers)
        others = ((os.cpu_count() or 1) * (after.wall - before.wall) - (after.idle - before.idle)
                  - ours_between(before, after)) / (after.wall - before.wall)
        rows.append({"step_s": wall, "gen_s": metrics["rollout/gen_seconds"], "tokens": metrics["rollout/tokens"],
                     "threads": metrics["time/threads"], "others_cores": max(0.0, others)})
    peak = max(peak_rss_mib(), *phases.peak.values())
    torch_peak = profiled_peak_mib(lambda: trainer.train_step(steps + 1))  # one more step, not timed
    fast = trainer.engine.uses_direct()
    state = state_mib(trainer)
    trainer.rollout.close()
    return {"rss_built_mib": built, "peak_rss_mib": peak, "step_mib": peak - built, "fast_decoder": fast,
            "torch_step_mib": torch_peak,
            "phase_growth_mib": phases.growth, "state": state, "steps": rows}


def summarize(result: dict) -> dict[str, float]:
    """Medians over the steps after the first that were quiet (other work took < QUIET_CORES cores), or over
    all steps after the first when none was; and the memory numbers of one process."""
    if len(result["steps"]) < 2:
        raise ValueError("need at least 2 steps: the first is not timed")
    quiet = [r for r in result["steps"][1:] if r["others_cores"] < QUIET_CORES]
    timed = quiet or result["steps"][1:]
    state, growth = result["state"], result["phase_growth_mib"]
    return {
        "quiet_steps": len(quiet), "timed_steps": len(result["steps"]) - 1,
        "sample_mib": growth.get("sample", 0.0), "prepare_mib": growth.get("prepare", 0.0),
        "update_mib": growth.get("update", 0.0),
        "step_s": statistics.median(r["step_s"] for r in timed),
        "gen_s": statistics.median(r["gen_s"] for r in timed),
        "rest_s": statistics.median(r["step_s"] - r["gen_s"] for r in timed),
        "tokens": statistics.median(r["tokens"] for r in timed),
        "threads": statistics.median(r["threads"] for r in timed),
        "peak_rss_mib": result["peak_rss_mib"], "rss_built_mib": result["rss_built_mib"],
        "step_mib": result["step_mib"], "torch_step_mib": result["torch_step_mib"],
        "fast_decoder": float(result["fast_decoder"]),
        "state_mib": state["weights"] + state["reference"] + state.get("sampling_copy", 0.0) + state["grads"]
        + state["optimizer"],
        "optimizer_mib": state["optimizer"], "params": state["params"], "trainable": state["trainable"],
    }


def run_case(model_dir: Path, rank: int, steps: int, threads: int, max_wait_s: float) -> dict:
    waited, quiet = wait_for_quiet(0.3, max_wait_s)
    load0, busy0, own0, t0 = loadavg(), cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), "--rank", str(rank), "--steps",
                           str(steps), "--threads", str(threads)],
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy, own = cpu_busy_seconds() - busy0, children_cpu_seconds() - own0
    if done.returncode != 0:
        sys.exit(f"lora_r={rank} on {model_dir.name} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(waited_s=waited, busy_cores_before=quiet, wall_s=wall, others_cores=max(0.0, busy - own) / wall,
                  loadavg_before=load0, loadavg_after=loadavg())
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["micro", "small"], help="built-in model sizes")
    ap.add_argument("--ranks", nargs="+", type=int, default=[0, 8, 32], help="model.lora_r values (0: full)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per process (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per case (the median is shown)")
    ap.add_argument("--threads", type=int, default=2, help="run.threads of every case")
    ap.add_argument("--max-wait", type=float, default=120.0,
                    help="before each process, wait up to this many seconds for other work to use < 0.3 cores")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "lora.json"),
                    help="where the numbers are written ('': nowhere)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rank, args.steps, args.threads)))
        return

    from transformers.utils import logging as hf_logging

    from gradus.models import build_char_tokenizer, build_tiny_model, save_pretrained

    hf_logging.disable_progress_bar()

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; loadavg {Path('/proc/loadavg').read_text().strip()}")
    raw: dict[str, dict[int, list[dict]]] = {size: {r: [] for r in args.ranks} for size in args.sizes}
    with tempfile.TemporaryDirectory(prefix="gradus-lora-bench-") as tmp:
        tokenizer = build_char_tokenizer()
        dirs = {}
        for size in args.sizes:
            dirs[size] = Path(tmp) / size
            save_pretrained(build_tiny_model(size, tokenizer=tokenizer, seed=0), tokenizer, dirs[size])
        for size in args.sizes:
            for rep in range(args.repeats):
                for rank in args.ranks if rep % 2 == 0 else args.ranks[::-1]:
                    r = run_case(dirs[size], rank, args.steps, args.threads, args.max_wait)
                    raw[size][rank].append(r)
                    print(f"  done: {size}, lora_r={rank}, repeat {rep + 1}: {r['wall_s']:.0f} s (waited "
                          f"{r['waited_s']:.0f} s for quiet), loadavg {r['loadavg_before']:.2f} -> "
                          f"{r['loadavg_after']:.2f}, others {r['others_cores']:.2f} cores",
                          file=sys.stderr, flush=True)

    summaries: dict[str, dict[int, dict[str, float]]] = {}
    for size, by_rank in raw.items():
        summaries[size] = {}
        for rank, results in by_rank.items():
            per = [summarize(r) for r in results]
            s = {k: statistics.median(p[k] for p in per) for k in per[0]}
            s["others_cores"] = statistics.median(r["others_cores"] for r in results)
            s["quiet_steps"] = sum(p["quiet_steps"] for p in per)
            s["timed_steps"] = sum(p["timed_steps"] for p in per)
            summaries[size][rank] = s
    print(f"\nGRPO step, 64 prompts x G=8 = 512 completions (<= 16 tokens), fp32, {args.threads} threads; median "
          f"of the quiet steps among 2..{args.steps} of each process (all if none was quiet), then of "
          f"{args.repeats} processes\n")
    print("| model | lora_r | trainable params | state MiB | of which AdamW | peak RSS MiB | step MiB | torch step MiB "
          "| step s | gen s | rest s | vs full | fast decoder | others, cores | quiet steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for size, by_rank in summaries.items():
        full = by_rank.get(0)
        for rank, s in by_rank.items():
            ratio = f"{s['step_s'] / full['step_s']:.2f}x" if full else "-"
            print(f"| {size} ({s['params'] / 1e6:.2f}M) | {rank or 'full'} | {s['trainable']:,.0f} | "
                  f"{s['state_mib']:.1f} | {s['optimizer_mib']:.1f} | {s['peak_rss_mib']:.0f} | {s['step_mib']:.0f} | "
                  f"{s['torch_step_mib']:.0f} | "
                  f"{s['step_s']:.2f} | {s['gen_s']:.2f} | {s['rest_s']:.2f} | {ratio} | "
                  f"{'yes' if s['fast_decoder'] else 'no'} | {s['others_cores']:.2f} | "
                  f"{s['quiet_steps']}/{s['timed_steps']} |")
    print("\nwhere the step's memory goes: the largest RSS growth within one call (MiB), medians of the processes\n")
    print("| model | lora_r | sampling | log-prob passes (prepare) | update |")
    print("|---|---:|---:|---:|---:|")
    for size, by_rank in summaries.items():
        for rank, s in by_rank.items():
            print(f"| {size} | {rank or 'full'} | {s['sample_mib']:.0f} | {s['prepare_mib']:.0f} | "
                  f"{s['update_mib']:.0f} |")
    runs = [r for by in raw.values() for rs in by.values() for r in rs]
    loads = [x for r in runs for x in (r["loadavg_before"], r["loadavg_after"])]
    others = [r["others_cores"] for r in runs]
    print(f"\nloadavg (1 min) around the processes: {min(loads):.2f} .. {max(loads):.2f} (this bench's own "
          f"included); other work took a median of {statistics.median(others):.2f} cores, at most {max(others):.2f}")
    print(f"\n(python bench/lora.py --sizes {' '.join(args.sizes)} --ranks {' '.join(map(str, args.ranks))} --steps "
          f"{args.steps} --repeats {args.repeats} --threads {args.threads})")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "cpu": cpu_model(), "cpus": os.cpu_count(),
            "command": " ".join(["python", "bench/lora.py", *(argv if argv is not None else sys.argv[1:])]),
            "summaries": summaries, "raw": raw}, indent=1))
        print(f"numbers written to {path}")


if __name__ == "__main__":
    main()
