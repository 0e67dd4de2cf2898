"""AdamW's step on CPU: PyTorch's per-tensor loop (its CPU default), `foreach=True` and `fused=True`.

The tiny models' weights and Adam states after the same sequence of steps and learning rates: whether each
implementation gives the loop's weights bit for bit, and the median time of a step, the three alternated in one
process. gradus trains with PyTorch's default (`gradus.runtime.trained.build_optim`): on AMD EPYC with 2 cores
(2026-12-07) `foreach` saved 0.4 ms of a 3.9 ms step on the micro model and lost 1.6 ms on the small one, both
bit for bit; `fused` took a third of the loop's time but rounds differently (1.2e-7), for about 1% of a training
step on the micro model.

    python bench/optimizer_step.py [--sizes micro,small] [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from gradus.models import build_char_tokenizer, build_tiny_model

KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def run(size: str, steps: int) -> dict[str, tuple[float, bool, float]]:
    """kind -> (median step seconds, bit-identical to the loop, largest weight difference from the loop)."""
    model = build_tiny_model(size, tokenizer=build_char_tokenizer())
    params = {kind: list(copy.deepcopy(model).parameters()) for kind in KINDS}
    opts = {kind: torch.optim.AdamW(ps, lr=2e-4, weight_decay=0.01, betas=(0.9, 0.99), **KINDS[kind])
            for kind, ps in params.items()}
    scheds = {kind: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5)) for kind, opt in
              opts.items()}
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params["loop"]]
        order = list(KINDS) if step % 2 == 0 else list(reversed(KINDS))  # alternate who goes first
        for kind in order:
            for p, g in zip(params[kind], grads, strict=True):
                p.grad = g.clone()
            start = time.perf_counter()
            opts[kind].step()
            times[kind].append(time.perf_counter() - start)
            scheds[kind].step()
    out = {}
    for kind in KINDS:
        diff = max((a - b).abs().max().item() for a, b in zip(params[kind], params["loop"], strict=True))
        out[kind] = (statistics.median(times[kind][2:]), diff == 0.0, diff)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="micro,small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | AdamW | step ms (median) | vs loop | weights equal to the loop's | largest difference |")
    print("|---|---|---:|---:|---|---:|")
    for size in args.sizes.split(","):
        got = run(size, args.steps)
        for kind, (seconds, same, diff) in got.items():
            print(f"| {size} | {kind} | {1e3 * seconds:.2f} | {seconds / got['loop'][0]:.2f} | "
                  f"{'bit for bit' if same else 'no'} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
