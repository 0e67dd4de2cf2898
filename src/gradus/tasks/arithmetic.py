"""Multi-digit integer arithmetic, sized for a tiny character-level model.

Prompt ``"12+345="``, answer ``"357"``: the completion is just the answer, then EOS. Operands have a random
number of digits (1..max_digits), so answers vary in length; ``*`` binds tighter than ``+``/``-``
(ordinary precedence, as Python evaluates it). Answers may be negative (``"7-12="`` -> ``"-5"``).

Difficulty levels (operand digits, operand count, operators):
1: 1 digit, 2 operands, + -       (200 distinct problems: a smoke test)
2: 2 digits, 2 operands, + -      (default: learnable by a ~1M-parameter model in minutes, not trivial)
3: 2 digits, 2 operands, + - *
4: 3 digits, 2 operands, + - *
5: 3 digits, 3 operands, + - *
6: 4 digits, 3 operands, + - *
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradus.tasks.base import Example, ProceduralTask


@dataclass(frozen=True)
class Level:
    max_digits: int
    operands: int
    ops: str


LEVELS: dict[int, Level] = {
    1: Level(1, 2, "+-"),
    2: Level(2, 2, "+-"),
    3: Level(2, 2, "+-*"),
    4: Level(3, 2, "+-*"),
    5: Level(3, 3, "+-*"),
    6: Level(4, 3, "+-*"),
}


def evaluate(operands: list[int], ops: str) -> int:
    """Value of ``operands[0] ops[0] operands[1] ...`` with * before + and -."""
    if len(ops) != len(operands) - 1:
        raise ValueError("need exactly one operator between each pair of operands")
    terms = [operands[0]]  # products, joined by the +/- in add_ops
    add_ops: list[str] = []
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= x
        elif op in "+-":
            add_ops.append(op)
            terms.append(x)
        else:
            raise ValueError(f"unknown operator {op!r}")
    total = terms[0]
    for op, term in zip(add_ops, terms[1:], strict=True):
        total = total + term if op == "+" else total - term
    return total


def random_operand(rng: random.Random, max_digits: int) -> int:
    """A number with a uniformly drawn digit count in 1..max_digits (so short numbers are common)."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


class ArithmeticTask(ProceduralTask):
    """Integer arithmetic problems ``"a+b*c="`` (levels in the module docstring)."""

    name = "arithmetic"
    default_reward = "numeric_match"

    def __init__(
        self,
        seed: int = 0,
        difficulty: int = 2,
        heldout_fraction: float = 0.1,
        heldout_size: int = 200,
        heldout_seed: int = 1234,
    ) -> None:
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty}")
        super().__init__(seed, heldout_fraction, heldout_size, heldout_seed)
        self.difficulty = difficulty
        self.level = LEVELS[difficulty]

    def generate(self, rng: random.Random) -> Example:
        operands = [random_operand(rng, self.level.max_digits) for _ in range(self.level.operands)]
        ops = "".join(rng.choice(self.level.ops) for _ in range(self.level.operands - 1))
        text = str(operands[0]) + "".join(op + str(x) for op, x in zip(ops, operands[1:], strict=True))
        return Example(
            prompt=text + "=", answer=str(evaluate(operands, ops)), meta={"difficulty": self.difficulty}
        )

    def problem_key(self, example: Example) -> str:
        return example.prompt
