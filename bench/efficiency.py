"""Efficiency against the machine: the update's achieved FLOP/s as a fraction of measured fp32 matmul peak.

1. Peak: `torch.mm` of two n x n fp32 matrices for each `--sizes` n, at the benchmark's thread count;
   GFLOP/s = 2 n^3 / t, median over `--repeats` after one warm-up; the peak is the best size's median.
   It is measured before and after the workload and the higher is used; when the two differ by more
   than 10% the machine was busy with something else and a warning says so.
2. Update: the training-step workload of bench/grpo_vs_trl.py (same model, prompts, G = 8, 8 prompts,
   32 new tokens, fp32; settings `plain` and `ref`), run by the same worker processes, timing only the
   update: gradus' `run_updates` (policy forward + backward + clip + AdamW, every epoch of the batch);
   for TRL (unless `--no-trl`) the step minus `_prepare_inputs`, i.e. its forward + backward + optimizer
   plus its loop's own bookkeeping. Median over `--steps` steps after `--warmup`.
3. FLOPs of an update, the usual 6 x parameters x tokens (forward 2, backward 4 per parameter and token),
   split where the model's work splits:
   6 x (P - P_head) x body tokens + 6 x P_head x head tokens, where P counts every parameter once
   (the tied embedding once, as the LM head's matmul weight: the input lookup costs no FLOPs), P_head =
   vocab x hidden, body tokens = the prompt + completion positions the decoder runs on, head tokens =
   the completion positions the LM head is applied to. Two counts are given: `padded`, the positions
   each library actually feeds its forward (gradus trims each micro-batch to its longest prompt and
   completion; TRL pads to the longest in the batch), and `real`, non-pad positions only. Achieved FLOP/s
   uses `real`, so padding counts as waste. Attention-score FLOPs (about 12 x layers x context x hidden
   per token, a few percent at this length) and gradus' recompute of the logits in the backward of its
   chunked log-prob are not counted: this is model FLOPs, not hardware FLOPs.
4. Matmul floor: the same FLOPs as `torch.mm` calls alone, at the model's own shapes. For every `nn.Linear`
   of the model (the LM head with the head tokens, every other with the body tokens, padded as fed), the
   forward's [T, in] x [in, out] and the backward's two, [T, out] x [out, in] and [out, T] x [T, in], each
   into a preallocated output; an RL step's worth (its tokens split evenly over its updates, one sequence
   of calls per update), the fastest of `--floor-repeats` after one warm-up (a floor: other work on the
   machine only adds time, so the least time is the measure). No norm, activation, attention, loss,
   autograd or optimizer work: an fp32 update of this model on this machine cannot take less time than
   this. `update / floor` is how much of the update is everything else, and the column `at its shapes`
   gives the matmul rate these small shapes reach, against the n x n peak.

    python bench/efficiency.py [--steps 5] [--warmup 2] [--settings plain ref] [--no-trl] [--threads N]
        [--floor-repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo_vs_trl as workload  # noqa: E402  (the shared workload lives beside this file)


def matmul_gflops(n: int, repeats: int, threads: int) -> float:
    """Median GFLOP/s of an n x n by n x n fp32 `torch.mm` (2 n^3 FLOPs), after one warm-up, on `threads`
    threads (torch's thread count is restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _median_mm_rate(n, repeats)
    finally:
        torch.set_num_threads(previous)


def _median_mm_rate(n: int, repeats: int) -> float:
    """Median GFLOP/s of `torch.mm` on n x n fp32 at the current thread count."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g)  # [n, n]
    b = torch.randn(n, n, generator=g)  # [n, n]
    out = torch.empty(n, n)  # [n, n]
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def linear_shapes(model_dir: str) -> list[tuple[int, int, bool]]:
    """(in, out, is the LM head) of every `nn.Linear` of the model in `model_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    head = model.get_output_embeddings()
    return [(m.in_features, m.out_features, m is head) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def matmul_floor(shapes: list[tuple[int, int, bool]], body_tokens: int, head_tokens: int, updates: int,
                 repeats: int, threads: int) -> tuple[float, float]:
    """(least seconds, FLOPs) of an RL step's update matmuls alone at the model's shapes (module docstring,
    point 4): `updates` times the calls of one update with body_tokens / updates and head_tokens / updates
    positions, on `threads` threads (torch's thread count is restored afterwards)."""
    body_tokens, head_tokens = round(body_tokens / updates), round(head_tokens / updates)
    g = torch.Generator().manual_seed(0)
    calls = []  # (a, b, out) of each torch.mm, forward first, then the backward's two per layer
    for backward in (False, True):
        for n_in, n_out, is_head in shapes:
            t = head_tokens if is_head else body_tokens
            if not backward:
                pairs = [((t, n_in), (n_in, n_out))]
            else:
                pairs = [((t, n_out), (n_out, n_in)), ((n_out, t), (t, n_in))]
            for left, right in pairs:
                a, b = torch.randn(*left, generator=g), torch.randn(*right, generator=g)
                calls.append((a, b, torch.empty(left[0], right[1])))
    calls = calls * updates
    flops = sum(2.0 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in calls)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            for a, b, out in calls:
                torch.mm(a, b, out=out)
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return min(times), flops


def head_parameters(model_dir: str) -> int:
    """vocab x hidden: the LM head's weight (tied to the input embedding in the tiny models)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config["vocab_size"]) * int(config["hidden_size"])


def update_flops(params: int, head: int, body_tokens: float, head_tokens: float) -> float:
    """6 x (P - P_head) x body tokens + 6 x P_head x head tokens (module docstring, point 3)."""
    return 6.0 * (params - head) * body_tokens + 6.0 * head * head_tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload.add_arguments(ap)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="matmul sizes for the peak")
    ap.add_argument("--repeats", type=int, default=5, help="timed matmuls per size")
    ap.add_argument("--floor-repeats", type=int, default=20, help="timed repeats of the matmul floor")
    ap.add_argument("--no-trl", action="store_true", help="measure gradus only")
    args = ap.parse_args(argv)
    workload.quiet()
    kinds = ("gradus",) if args.no_trl else ("gradus", "trl")
    rows_per_step = args.group_size * args.prompts_per_step

    before = {n: matmul_gflops(n, args.repeats, args.threads) for n in args.sizes}
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gradus-efficiency-") as tmp:
        workloads = workload.prepare_workloads(args, Path(tmp))
        model_dir = next(iter(workloads.values())).model_dir
        head, shapes = head_parameters(model_dir), linear_shapes(model_dir)
        for name, wl in workloads.items():
            raw = workload.run_setting(wl, args.warmup, args.steps, kinds)
            results[name] = {kind: workload.summarize(r, rows_per_step) for kind, r in raw.items()}
    after = {n: matmul_gflops(n, args.repeats, args.threads) for n in args.sizes}
    floors: dict[tuple[float, float, int], tuple[float, float]] = {}  # by (body, head tokens, updates)
    for name, by in results.items():
        for s in by.values():
            key = (s["body_tokens"], s["head_tokens"], workloads[name].updates)
            if key not in floors:
                floors[key] = matmul_floor(shapes, *key, repeats=args.floor_repeats, threads=args.threads)
    peak = max(max(before.values()), max(after.values()))

    print(f"\nfp32 matmul (torch.mm, n x n), median of {args.repeats}, {args.threads} threads\n")
    print("| n | GFLOP/s before | GFLOP/s after |")
    print("|---:|---:|---:|")
    for n in args.sizes:
        print(f"| {n} | {before[n]:,.1f} | {after[n]:,.1f} |")
    print(f"\npeak: {peak:,.1f} GFLOP/s")
    if abs(max(before.values()) - max(after.values())) > 0.1 * peak:
        print("WARNING: the peak moved by more than 10% during the run; the machine was not quiet")
    print()
    print(f"Update pass of the GRPO training step ({args.size} model), median of {args.steps} steps after "
          f"{args.warmup} warm-up; tokens and FLOPs per RL step (all its updates)\n")
    print("| setting | library | params | update s | body tokens padded / real | head tokens padded / real "
          "| GFLOP (real) | GFLOP/s | % of peak | real / padded | matmul floor s | update / floor | at its shapes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, by in results.items():
        for kind, s in by.items():
            flops_real = update_flops(s["params"], head, s["body_real"], s["head_real"])
            flops_padded = update_flops(s["params"], head, s["body_tokens"], s["head_tokens"])
            rate = flops_real / s["update_s"] / 1e9
            floor_s, floor_flops = floors[(s["body_tokens"], s["head_tokens"], workloads[name].updates)]
            print(f"| {name} | {kind} | {s['params']:,} | {s['update_s']:.3f} | {s['body_tokens']:,.0f} / "
                  f"{s['body_real']:,.0f} | {s['head_tokens']:,.0f} / {s['head_real']:,.0f} | {flops_real / 1e9:.2f} "
                  f"| {rate:,.1f} | {100 * rate / peak:.1f}% | {flops_real / flops_padded:.2f} "
                  f"| {floor_s:.3f} | {s['update_s'] / floor_s:.2f}x "
                  f"| {100 * floor_flops / floor_s / 1e9 / peak:.0f}% |")
    print(f"\n{workload.machine_line(args.threads)}; {workload.threads_line(results)}")
    print(f"command: PYTHONPATH=src python bench/efficiency.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
