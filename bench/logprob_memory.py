"""Peak memory and time of chunked `token_logprobs` vs naive log_softmax + gather, forward + backward.

Each method runs in its own fresh subprocess, so one method's allocations cannot hide the other's.
Peak memory is the rise of the process's peak RSS (`resource.getrusage().ru_maxrss`) over its value
after the inputs were built (CPU), or `torch.cuda.max_memory_allocated` over the memory allocated
after the inputs were built (CUDA). Time is the median over `--repeats` forward+backward passes.
Both methods also print a checksum (sum of log-probs, norm of the hidden-state gradient) so a reader
can see that they computed the same thing.

    python bench/logprob_memory.py                      # V=150000, 8 x 1024 tokens, H=256, CPU
    python bench/logprob_memory.py --device cuda --vocab 152064 --hidden 3584
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

from gradus.logprobs import token_logprobs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=4096, help="tokens per chunk (chunked method)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    n_tokens = args.batch * args.seq
    hidden = torch.randn(n_tokens, args.hidden, generator=generator)  # [N, H]
    weight = torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5  # [V, H]
    targets = torch.randint(0, args.vocab, (n_tokens,), generator=generator)  # [N]
    hidden = hidden.to(device=args.device, dtype=dtype).requires_grad_()
    weight = weight.to(device=args.device, dtype=dtype).requires_grad_()
    return hidden, weight, targets.to(args.device)


def _naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, _chunk: int) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # [N, V]
    return logits.log_softmax(dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # [N]


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    return token_logprobs(hidden, weight, targets, chunk_size=chunk)  # [N]


def run_worker(args: argparse.Namespace) -> dict:
    """One method, in this process: time and peak memory of forward + backward."""
    if args.threads:
        torch.set_num_threads(args.threads)
    method = {"naive": _naive, "chunked": _chunked}[args.worker]
    hidden, weight, targets = _make_inputs(args)
    cuda = hidden.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        logp = method(hidden, weight, targets, args.chunk_size)  # [N]
        logp.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes()
    return {
        "method": args.worker,
        "peak_bytes": peak - base,
        "median_s": statistics.median(times),
        "times_s": times,
        "logp_sum": float(logp.detach().double().sum()),
        "grad_hidden_norm": float(hidden.grad.double().norm()),
    }


def _worker_argv(args: argparse.Namespace, method: str) -> list[str]:
    argv = [sys.executable, __file__, "--worker", method]
    names = ("vocab", "batch", "seq", "hidden", "chunk_size", "dtype", "device", "repeats", "threads", "seed")
    for name in names:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    results = {}
    for method in ("naive", "chunked"):
        done = subprocess.run(_worker_argv(args, method), capture_output=True, text=True, check=True)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    gib = 1024**3
    print(f"V={args.vocab}, tokens={args.batch}x{args.seq}, H={args.hidden}, dtype={args.dtype}, "
          f"device={args.device}, chunk_size={args.chunk_size}, repeats={args.repeats}, "
          f"torch threads={args.threads or torch.get_num_threads()}\n")
    print("| method | peak memory (GiB) | median time (s) | sum log p | norm grad hidden |")
    print("| --- | --- | --- | --- | --- |")
    for row in (naive, chunked):
        print(f"| {row['method']} | {row['peak_bytes'] / gib:.3f} | {row['median_s']:.2f} | "
              f"{row['logp_sum']:.4f} | {row['grad_hidden_norm']:.6f} |")
    print(f"| chunked / naive | {chunked['peak_bytes'] / naive['peak_bytes']:.3f} | "
          f"{chunked['median_s'] / naive['median_s']:.3f} | | |")
    rerun = [sys.executable, "bench/logprob_memory.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"\nrerun: PYTHONPATH=src {shlex.join(rerun)}")


if __name__ == "__main__":
    main()
