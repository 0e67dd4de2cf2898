"""What every task provides: deterministic training examples, a disjoint held-out set, prompt rendering.

A trainer's data position is one integer: ``train_example(index)`` is a pure function of the task's seed
and ``index``, so resuming needs only the index and data-parallel rank ``r`` of ``w`` can take indices
``r, r + w, r + 2w, ...``. ``heldout(n)`` is a fixed list that never overlaps the training stream.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One problem: ``prompt`` is the problem text before any template; ``meta`` holds task fields;
    ``source`` says where it came from (e.g. "data.jsonl: row 12 (line 14)"), for messages only."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)


def seeded_rng(*parts: object) -> random.Random:
    """A Random seeded from the parts' text: the same in every process (str seeds go through SHA-512)."""
    return random.Random(":".join(str(p) for p in parts))


def in_heldout_split(task_name: str, key: str, fraction: float) -> bool:
    """Deterministic split of a problem (by its ``key``) into held-out or train, ~``fraction`` held out.

    Depends only on the problem, not on any seed, so the held-out problems are excluded from every training
    stream, whatever its seed.
    """
    digest = hashlib.blake2b(f"{task_name}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def reward_fields(examples: Sequence[Example]) -> dict[str, list[Any]]:
    """Per-completion reward fields: ``answer`` plus every meta key, one entry per example."""
    fields: dict[str, list[Any]] = {"answer": [ex.answer for ex in examples]}
    for key in sorted({k for ex in examples for k in ex.meta}):
        fields[key] = [ex.meta.get(key) for ex in examples]
    return fields


class Task(ABC):
    """Base class of tasks (see module docstring)."""

    name: str = "task"
    default_reward: str = "exact_match"

    @abstractmethod
    def train_example(self, index: int) -> Example:
        """Training example number ``index`` (>= 0), a deterministic function of (seed, index)."""

    @abstractmethod
    def heldout(self, n: int | None = None) -> list[Example]:
        """The first ``n`` (all if None) of a fixed held-out set, disjoint from the training stream."""

    def plain_prompt(self, example: Example) -> str:
        """The prompt for a model without a chat template. Subclasses with a template override this."""
        return example.prompt

    def render_prompt(self, example: Example, tokenizer: Any = None, tools: list[dict] | None = None) -> str:
        """The text to feed the model: the tokenizer's chat template if it has one, else ``plain_prompt``.
        ``tools``: function schemas the chat template lists (an environment's tools); unused without one."""
        text = self.plain_prompt(example)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False,
                **({"tools": tools} if tools else {}),
            )
            return str(rendered)
        return text

    def train_batch(self, start: int, size: int) -> list[Example]:
        """Examples ``start, start + 1, ..., start + size - 1``."""
        return [self.train_example(i) for i in range(start, start + size)]


def check_index(index: int) -> None:
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")


class ProceduralTask(Task):
    """A task whose problems come from a seeded generator.

    Held-out problems are those whose ``problem_key`` falls in the hash split (``in_heldout_split``); the
    training stream skips them (redrawing with the next attempt number), so the two never overlap. The
    held-out list is drawn from its own stream (``heldout_seed``), deduplicated, in a fixed order.
    """

    max_attempts = 1000

    def __init__(self, seed: int, heldout_fraction: float, heldout_size: int, heldout_seed: int) -> None:
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.seed = seed
        self.heldout_fraction = heldout_fraction
        self.heldout_size = heldout_size
        self.heldout_seed = heldout_seed
        self._heldout_cache: dict[int, list[Example]] = {}

    @abstractmethod
    def generate(self, rng: random.Random) -> Example:
        """One problem drawn with ``rng`` (train or held-out alike)."""

    @abstractmethod
    def problem_key(self, example: Example) -> str:
        """What identifies a problem: two examples with the same key are the same problem."""

    def is_heldout(self, example: Example) -> bool:
        return in_heldout_split(self.name, self.problem_key(example), self.heldout_fraction)

    def train_example(self, index: int) -> Example:
        check_index(index)
        for attempt in range(self.max_attempts):
            example = self.generate(seeded_rng(self.name, "train", self.seed, index, attempt))
            if not self.is_heldout(example):
                return example
        raise RuntimeError(
            f"{self.name}: no training problem outside the held-out split in {self.max_attempts} draws"
        )

    def heldout(self, n: int | None = None) -> list[Example]:
        want = self.heldout_size if n is None else n
        if want not in self._heldout_cache:
            found: list[Example] = []
            seen: set[str] = set()
            # Small problem spaces have few held-out problems: stop after a bounded number of draws.
            draws = 200 * want + 10_000
            for i in range(draws):
                example = self.generate(seeded_rng(self.name, "heldout", self.heldout_seed, i))
                key = self.problem_key(example)
                if key not in seen and self.is_heldout(example):
                    seen.add(key)
                    found.append(example)
                    if len(found) == want:
                        break
            if n is not None and len(found) < n:
                raise ValueError(
                    f"{self.name}: only {len(found)} distinct held-out problems found, asked for {n}"
                )
            self._heldout_cache[want] = found
        return list(self._heldout_cache[want])
