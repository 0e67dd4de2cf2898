"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

Instances are generated solvable: draw ``num_numbers`` numbers in 1..max_number, combine them all in a
random binary tree of random operators, keeping every intermediate a non-negative integer (``-`` takes the
larger first, ``/`` only when it divides exactly, and never by 1), and use the result as the target (kept
when 1 <= target <= max_target and not one of the numbers). The tree, written with minimal parentheses, is
the reference ``answer``; the reward accepts ANY correct expression. Prompt: ``"3 5 7 -> 22:"``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradus.tasks.base import Example, ProceduralTask

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


@dataclass(frozen=True)
class _Node:
    value: int
    text: str
    prec: int


def _combine(a: _Node, b: _Node, op: str) -> _Node | None:
    """``a op b`` if it keeps integers non-negative (None otherwise), with minimal parentheses."""
    if op == "+":
        value = a.value + b.value
    elif op == "-":
        if a.value < b.value:
            a, b = b, a
        value = a.value - b.value
    elif op == "*":
        value = a.value * b.value
    else:
        if b.value in (0, 1) or a.value % b.value:
            return None
        value = a.value // b.value
    prec = _PREC[op]
    left = a.text if a.prec >= prec else f"({a.text})"
    # The right side of - and / needs brackets at equal precedence too: a-(b+c) != a-b+c, a/(b*c) != a/b*c.
    right_ok = b.prec > prec or (b.prec == prec and op in "+*")
    right = b.text if right_ok else f"({b.text})"
    return _Node(value, f"{left}{op}{right}", prec)


class CountdownTask(ProceduralTask):
    """Countdown instances (see module docstring); meta holds ``numbers`` and ``target``."""

    name = "countdown"
    default_reward = "countdown"

    def __init__(
        self,
        seed: int = 0,
        num_numbers: int = 3,
        max_number: int = 20,
        max_target: int = 200,
        heldout_fraction: float = 0.1,
        heldout_size: int = 200,
        heldout_seed: int = 1234,
    ) -> None:
        if num_numbers not in (2, 3, 4, 5):
            raise ValueError(f"num_numbers must be 2..5, got {num_numbers}")
        if max_number < 2 or max_target < 1:
            raise ValueError("max_number must be >= 2 and max_target >= 1")
        super().__init__(seed, heldout_fraction, heldout_size, heldout_seed)
        self.num_numbers = num_numbers
        self.max_number = max_number
        self.max_target = max_target

    def _try_generate(self, rng: random.Random) -> tuple[list[int], _Node] | None:
        numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
        pool = [_Node(n, str(n), _ATOM) for n in numbers]
        while len(pool) > 1:
            a = pool.pop(rng.randrange(len(pool)))
            b = pool.pop(rng.randrange(len(pool)))
            node = _combine(a, b, rng.choice("+-*/"))
            if node is None:
                return None
            pool.append(node)
        root = pool[0]
        if not 1 <= root.value <= self.max_target or root.value in numbers:
            return None
        return numbers, root

    def generate(self, rng: random.Random) -> Example:
        for _ in range(10_000):
            found = self._try_generate(rng)
            if found is not None:
                numbers, root = found
                rng.shuffle(numbers)
                prompt = f"{' '.join(map(str, numbers))} -> {root.value}:"
                return Example(
                    prompt=prompt, answer=root.text, meta={"numbers": numbers, "target": root.value}
                )
        raise RuntimeError("countdown: no valid instance in 10000 draws; raise max_target or max_number")

    def problem_key(self, example: Example) -> str:
        return f"{sorted(example.meta['numbers'])}->{example.meta['target']}"
