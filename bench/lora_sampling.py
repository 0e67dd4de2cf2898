"""LoRA sampling: the local engine on the PEFT model's own forward against the merged copy it samples from.

A LoRA policy is a PEFT model: its forward adds each adapter (B A x, scaled) to every adapted layer at every
token, and the rollout's fast decoder refuses it (it reads plain weights). The local engine therefore samples
from a merged copy of the policy (a plain model, W + B A alpha / r, refreshed after every update), which the
fast decoder runs. This bench times both on the same batch: the built-in models of `--sizes` (untrained, seed
0, the char tokenizer) with rank-`--rank` adapters on gradus' default targets, their B matrices drawn so the
adapters change the model; 64 prompts x G=8 completions of 16 tokens at temperature 1, EOS ignored (every
completion runs to the limit); the two ways alternate, `--repeats` times, in one process with `--threads`
threads; medians. It also checks that both sample the same completions (the same keys, the same weights up to
rounding: a flip is counted, not an error) and times the merge itself (`export_weights` into the copy).

    python bench/lora_sampling.py [--sizes micro small] [--rank 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from gradus.config import ModelConfig
    from gradus.models import build_char_tokenizer, build_tiny_model, lora
    from gradus.rollout import LocalEngine, SamplingParams
    from gradus.runtime import new_plain

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "small"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    prompts = [tokenizer(f"{i} + {2 * i} = ? ", add_special_tokens=False)["input_ids"] for i in range(64)]
    print("| model | lora_r | PEFT forward s | merged copy s | speed-up | merge s | same completions |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        base = build_tiny_model(size, tokenizer=tokenizer, seed=0)
        plain_class, config = type(base), base.config
        policy = lora.apply_lora(base, ModelConfig(lora_r=args.rank))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        policy.eval()
        copy = new_plain(plain_class, config, torch.float32, device=torch.device("cpu"))
        merged = LocalEngine(copy, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[])
        start = time.perf_counter()
        merged.sync(lora.merged_tensors(policy, ((n, p.detach()) for n, p in
                                                 policy.named_parameters(remove_duplicate=False))))
        merge_s = time.perf_counter() - start
        own = LocalEngine(policy, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[])
        assert own.uses_direct() is False and merged.uses_direct() is True
        times: dict[str, list[float]] = {"own": [], "merged": []}
        same = []
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            batches = {}
            for name, engine in (("own", own), ("merged", merged)) if repeat % 2 else (("merged", merged),
                                                                                     ("own", own)):
                start = time.perf_counter()
                batches[name] = engine.generate(prompts, 8, params, seed=repeat)
                if repeat:
                    times[name].append(time.perf_counter() - start)
            same.append(float((batches["own"].completion_ids == batches["merged"].completion_ids).all(-1)
                              .float().mean()))
        own_s, merged_s = statistics.median(times["own"]), statistics.median(times["merged"])
        print(f"| {size} | {args.rank} | {own_s:.3f} | {merged_s:.3f} | {own_s / merged_s:.2f}x | {merge_s:.3f} "
              f"| {statistics.mean(same):.1%} |")
    print(f"\n(python bench/lora_sampling.py --sizes {' '.join(args.sizes)} --rank {args.rank} "
          f"--repeats {args.repeats} --threads {args.threads})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
