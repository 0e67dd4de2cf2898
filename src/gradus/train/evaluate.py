"""Held-out evaluation: greedy accuracy and pass@k with the task's own verifier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradus.rewards import CombinedReward
from gradus.rollout import RolloutEngine, SamplingParams
from gradus.tasks import Example, Task, reward_fields
from gradus.train.data import encode_prompts

# (prompts, completions, examples) -> the task's verdict per completion
Verifier = Callable[[list[str], list[str], list[Example]], list[bool]]


def correct_flags(tokenizer: Any, prompts: list[str], ids: list[list[int]], lengths: list[int],
                  examples: list[Example], verify: Verifier) -> list[bool]:
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths, strict=True)], skip_special_tokens=True)
    return verify(prompts, texts, examples)


@torch.no_grad()
def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    examples: list[Example],
    *,
    max_new_tokens: int,
    k: int = 0,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    verify: Verifier | None = None,
    reward_timeout_s: float = 5.0,
) -> dict[str, float]:
    """Sample with `engine` (`gradus.train.engines.build_engine`) and judge.
    {"accuracy": greedy accuracy, "pass_at_k": share of problems with a correct answer among k
    samples (only when k > 0), "n": number of problems}. ``verify`` judges the completions (the trainer
    passes its Scorer's); None: the task's verifier, in reward workers of its own started for this call,
    under ``reward_timeout_s`` (a completion the model writes can hang math_verify in C code)."""
    if verify is None:
        with CombinedReward([task.default_reward], timeout_s=reward_timeout_s) as reward:

            def verify_in_workers(prompts: list[str], texts: list[str], rows: list[Example]) -> list[bool]:
                scores, _, _ = reward.score_part(0, prompts, texts, reward_fields(rows))
                return [v >= 1.0 for v in scores]

            return evaluate(engine, tokenizer, task, examples, max_new_tokens=max_new_tokens, k=k,
                            temperature=temperature, batch_size=batch_size, seed=seed, verify=verify_in_workers)
    right, any_right = 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = encode_prompts(task, tokenizer, chunk)
        greedy = engine.generate(prompts.ids, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
        right += sum(correct_flags(tokenizer, prompts.texts, greedy.completion_ids.tolist(),
                                   greedy.lengths.tolist(), chunk, verify))
        if k > 0:
            sampled = engine.generate(prompts.ids, k, SamplingParams(temperature=temperature,
                                                                     max_new_tokens=max_new_tokens),
                                      seed=seed + start)
            rows = sampled.prompt_index.tolist()
            flags = correct_flags(tokenizer, [prompts.texts[i] for i in rows],
                                  sampled.completion_ids.tolist(), sampled.lengths.tolist(),
                                  [chunk[i] for i in rows], verify)
            solved = torch.tensor(flags).view(len(chunk), k).any(dim=1)  # [chunk]
            any_right += int(solved.sum())
    n = len(examples)
    out = {"accuracy": right / max(n, 1), "n": n}
    if k > 0:
        out["pass_at_k"] = any_right / max(n, 1)
        out["k"] = k
    return out
