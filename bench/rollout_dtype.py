"""Sampling in bf16 against fp32 with `LocalEngine`, for a dense and an MoE built-in model (`rollout.dtype`).

The rollout of a training step of 64 prompts (the default until issue 11; now 16): countdown-like prompts
x 8 completions x 16 new tokens, temperature 1,
no early stop (no EOS id), the built-in `micro` size untrained (speed does not depend on the weights' values).
Tokens per second, median of --repeats alternating repeats after one warm-up each. On a CPU with AVX512-BF16
(or AMX) bf16 matmuls run on the bf16 units; without them PyTorch emulates them and bf16 is slower. The dense
model samples with the fast decoder, the MoE model with its own forward (which the fast decoder refuses).

    python bench/rollout_dtype.py [--archs qwen2 qwen2_moe] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.rollout import LocalEngine, SamplingParams


def tokens_per_second(engine: LocalEngine, prompts: list[list[int]], n: int, T: int, seed: int) -> float:
    start = time.perf_counter()
    batch = engine.generate(prompts, n, SamplingParams(temperature=1.0, max_new_tokens=T), seed=seed)
    return batch.num_completion_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["qwen2", "qwen2_moe"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    tokenizer = build_char_tokenizer()
    prompts = [tokenizer.encode(f"{3 * i + 1} {i + 7} {2 * i} -> {i + 40}: ") for i in range(args.prompts)]
    info = Path("/proc/cpuinfo")
    flags = info.read_text() if info.exists() else ""
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, avx512_bf16: {'avx512_bf16' in flags}, "
          f"amx_bf16: {'amx_bf16' in flags}; {args.prompts} prompts x {args.samples} x {args.new_tokens} tokens\n")
    print("| model | fp32 tok/s | bf16 tok/s | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    for arch in args.archs:
        fp32 = build_tiny_model("micro", tokenizer=tokenizer, arch=arch, seed=0).eval()
        engines = {"fp32": LocalEngine(fp32, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[]),
                   "bf16": LocalEngine(build_tiny_model("micro", tokenizer=tokenizer, arch=arch, seed=0)
                                       .eval().to(torch.bfloat16), pad_token_id=tokenizer.pad_token_id,
                                       eos_token_ids=[])}
        rates: dict[str, list[float]] = {k: [] for k in engines}
        for engine in engines.values():  # warm-up
            tokens_per_second(engine, prompts, args.samples, args.new_tokens, seed=0)
        for r in range(args.repeats):
            for name, engine in engines.items():
                rates[name].append(tokens_per_second(engine, prompts, args.samples, args.new_tokens, seed=r))
        a, b = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
        print(f"| micro {arch} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |", flush=True)
    print(f"\nrerun: python bench/rollout_dtype.py --archs {' '.join(args.archs)} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
