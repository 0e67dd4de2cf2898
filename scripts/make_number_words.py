"""Write a JSONL file of numbers to spell in English words: a user-data example that is neither countdown
nor arithmetic (docs/training.md, "Your own data").

Each row is {"question": "spell 347", "answer": "three hundred forty-seven"}: the reward is an exact match
of the whole completion, so a model must get every word and hyphen right. Numbers are drawn without
repetition from 1..MAX by a seeded RNG, so the file is the same on every machine.

Run: python scripts/make_number_words.py --out numbers.jsonl [--max 999] [--rows N (default: --max)] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """0 <= n < 1,000,000 in words, American style without "and": 347 -> 'three hundred forty-seven'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"n must be in 0..999999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + words(n % 100))
    return words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + words(n % 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--rows", type=int, default=None, help="rows, each a distinct number (default: --max)")
    parser.add_argument("--max", type=int, default=999, help="largest number, below 1,000,000 (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.max < 1_000_000:
        parser.error("--max must be in 1..999999")
    if args.rows is None:
        args.rows = args.max
    if not 1 <= args.rows <= args.max:
        parser.error(f"--rows must be in 1..{args.max} (the numbers are distinct)")
    numbers = random.Random(args.seed).sample(range(1, args.max + 1), args.rows)
    with Path(args.out).open("w", encoding="utf-8") as f:
        for n in numbers:
            f.write(json.dumps({"question": f"spell {n}", "answer": words(n)}) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
