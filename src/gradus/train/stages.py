"""The named stages of a training step, each timed into `time/<stage>_s` of the step's metrics line.

    rollout -> score -> old_logprobs -> ref_logprobs -> advantages -> update -> sync -> log

A stage that runs several times in a step (DAPO's generation rounds alternate rollout and score) adds up;
one that does not run in a step (no reference model, an engine that samples from the policy itself) is
not logged. Benchmarks read these keys from metrics.jsonl (`bench/`), so they time what a run times.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("rollout", "score", "old_logprobs", "ref_logprobs", "advantages", "update", "sync", "log")


class StageTimer:
    """Wall seconds per named stage of one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{stage}_s": self.seconds[stage] for stage in STAGES if stage in self.seconds}
