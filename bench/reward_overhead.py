"""Cost of scoring one training step's completions in the reward workers, against calling the reward here.

The workload: 512 completions (64 prompts x G = 8), a few hundred characters of reasoning each, ending in
an answer, a third of them right: for `countdown` an expression over the given numbers, for
`math_equivalent` a LaTeX answer (fractions, roots, plain numbers) that math_verify must parse. Timed per
reward, `--repeats` times after one warm-up call each, median and min:
- `direct`: the reward function called in this process, as the trainer did before the workers (the old
  SIGALRM limit added microseconds to it);
- `pool`: ``CombinedReward([reward])(...)`` with `--workers` worker processes (default: the library's),
  i.e. pickling the batch, one request per worker, the workers' scoring (in parallel), the answers.
The machine's other load shows up as noise: compare medians with their mins.

    PYTHONPATH=src python bench/reward_overhead.py [--repeats 7] [--workers N]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time

from gradus.rewards import CombinedReward, get_reward
from gradus.rewards.pool import default_workers

FILLER = "Let me think step by step. First I compare the numbers, then I try a few combinations. "
MATH_ANSWERS = [r"\frac{3}{4}", "12", r"2\sqrt{3}", r"\frac{\pi}{6}", "-5", r"x^2+1", "0.25", r"\sqrt{2}/2"]


def countdown_batch(n: int, rng: random.Random) -> tuple[list[str], dict[str, list]]:
    completions, numbers, target = [], [], []
    for i in range(n):
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 20)
        expr = f"{a}+{b}*{c}" if i % 3 == 0 else f"({a}-{b})*{c}"
        completions.append(FILLER * rng.randint(2, 6) + f"<answer>{expr}</answer>")
        numbers.append([a, b, c])
        target.append(a + b * c)
    return completions, {"numbers": numbers, "target": target}


def math_batch(n: int, rng: random.Random) -> tuple[list[str], dict[str, list]]:
    completions, answers = [], []
    for i in range(n):
        gold = rng.choice(MATH_ANSWERS)
        said = gold if i % 3 == 0 else rng.choice(MATH_ANSWERS)
        completions.append(FILLER * rng.randint(2, 6) + f"So the final answer is $\\boxed{{{said}}}$.")
        answers.append(gold)
    return completions, {"answer": answers}


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: imports, caches
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--n", type=int, default=512)
    args = parser.parse_args()
    rng = random.Random(0)
    workers = args.workers or default_workers()
    print(f"{args.n} completions, {workers} workers; seconds per call: median (min) of {args.repeats}")
    for name, make in (("countdown", countdown_batch), ("math_equivalent", math_batch)):
        completions, fields = make(args.n, rng)
        prompts = ["p"] * args.n
        direct_fn = get_reward(name)
        direct = timed(functools.partial(direct_fn, prompts, completions, **fields), args.repeats)
        with CombinedReward([name], timeout_s=60.0, workers=workers) as combined:
            pool = timed(functools.partial(combined, prompts, completions, **fields), args.repeats)
            assert combined(prompts, completions, **fields).total == direct_fn(prompts, completions, **fields)
        for label, times in (("direct", direct), ("pool", pool)):
            print(f"{name:16s} {label:7s} {statistics.median(times):.4f} ({min(times):.4f})")


if __name__ == "__main__":
    main()
