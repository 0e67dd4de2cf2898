"""Forward + backward time of `completion_logprobs` with the HF decoder forward vs gradus' lean forward.

The workload is the update of bench/grpo_vs_trl.py: a tiny model (`--size`, default micro), `--rows` 64
rows of `--prompt-len` 24 prompt tokens and `--completion-len` 32 completion tokens. Two padding cases:
`padded` (completion lengths drawn uniformly from 1..completion-len, right-padded, and the first
quarter of the rows with 4 left-padded prompt tokens: the boolean-mask attention path) and `full`
(no padding: the is_causal path). One timed call = completion_logprobs + backward of the sum of the
masked log-probs; the two paths alternate, `--repeats` times each after one warm-up call each, and the
table shows the median and min per path and the speed-up of the medians. The machine's other load
shows up as noise: run it on a quiet machine, and compare medians with their mins.

    PYTHONPATH=src python bench/lean_forward.py [--size micro] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from gradus.logprobs import completion_logprobs
from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.models.lean import hf_forward_forced, unsupported_reason


def make_batch(rows: int, prompt_len: int, completion_len: int, vocab: int, padded: bool, seed: int = 0):
    """input_ids [B, S], attention_mask [B, S] (1 = token) and the completion mask [B, L]."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = prompt_len + completion_len
    input_ids = torch.randint(3, vocab, (rows, seq_len), generator=generator)  # [B, S]
    attention_mask = torch.ones(rows, seq_len, dtype=torch.long)  # [B, S]
    if padded:
        lengths = torch.randint(1, completion_len + 1, (rows,), generator=generator)  # [B]
        columns = torch.arange(completion_len)  # [L]
        attention_mask[:, prompt_len:] = (columns[None, :] < lengths[:, None]).long()
        attention_mask[: rows // 4, :4] = 0  # left-padded prompts
        input_ids[attention_mask == 0] = 0  # pad id
    return input_ids, attention_mask, attention_mask[:, prompt_len:].float()


def time_step(model, input_ids, attention_mask, completion_mask, prompt_len: int) -> float:
    """Seconds for one completion_logprobs forward + backward; gradients are cleared first."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logp = completion_logprobs(model, input_ids, attention_mask, prompt_len)  # [B, L]
    (logp * completion_mask).sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="micro")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(args.size, tokenizer=tokenizer)
    model.train()
    reason = unsupported_reason(model.get_decoder())
    if reason is not None:
        raise SystemExit(f"lean forward unsupported for this model: {reason}")
    print(" ".join([sys.executable, *sys.argv]))
    print(f"size={args.size} rows={args.rows} prompt={args.prompt_len} completion={args.completion_len} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} torch={torch.__version__}")
    print(f"{'case':<8} {'path':<5} {'median ms':>10} {'min ms':>8} {'speed-up':>9}")
    for case in ("padded", "full"):
        batch = make_batch(args.rows, args.prompt_len, args.completion_len, len(tokenizer), case == "padded")
        times: dict[str, list[float]] = {"hf": [], "lean": []}
        for repeat in range(args.repeats + 1):
            for path in ("hf", "lean"):
                if path == "hf":
                    with hf_forward_forced():
                        seconds = time_step(model, *batch, args.prompt_len)
                else:
                    seconds = time_step(model, *batch, args.prompt_len)
                if repeat > 0:  # the first round warms up both paths
                    times[path].append(seconds)
        medians = {path: statistics.median(values) for path, values in times.items()}
        for path, values in times.items():
            speedup = f"{medians['hf'] / medians[path]:.2f}x" if path == "lean" else ""
            print(f"{case:<8} {path:<5} {1e3 * medians[path]:>10.1f} {1e3 * min(values):>8.1f} {speedup:>9}")


if __name__ == "__main__":
    main()
