"""Where prompts come from during training: a task's training stream, as token ids.

The data position is one integer (the next example index), so a checkpoint stores it and a
resumed run continues exactly. Data-parallel rank r of w takes indices r, r + w, r + 2w, ...: a step
of n prompts per rank uses the same n * w examples whatever w is (the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradus.tasks import Example, Task


@dataclass
class Prompts:
    examples: list[Example]
    texts: list[str]
    ids: list[list[int]]
    indices: list[int] | None = None  # each example's index in the task's training stream


def prompt_problems(task: Task, tokenizer: Any, examples: list[Example], *, positions: int,
                    max_new_tokens: int) -> list[str | None]:
    """For each example: why its prompt does not fit the model's ``positions`` with room for
    ``max_new_tokens`` more, or None when it fits (encoded in chunks, as training would)."""
    found: list[str | None] = []
    for start in range(0, len(examples), 1024):
        for row in encode_prompts(task, tokenizer, examples[start : start + 1024]).ids:
            found.append(None if len(row) + max_new_tokens <= positions else
                         f"a prompt of {len(row)} tokens + rollout.max_new_tokens={max_new_tokens} is more than "
                         f"the model's {positions} positions")
    return found


def encode_prompts(task: Task, tokenizer: Any, examples: list[Example], tools: list[dict] | None = None) -> Prompts:
    """Render each example with the task's template (or the tokenizer's chat template, listing `tools`) and
    tokenize."""
    texts = [task.render_prompt(ex, tokenizer, tools) for ex in examples]
    # A chat template already holds whatever special tokens the model expects.
    special = not bool(getattr(tokenizer, "chat_template", None))
    ids = [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
    for text, row in zip(texts, ids, strict=True):
        if not row:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
    return Prompts(examples, texts, ids)


class PromptSource:
    """The training stream of a task for one data-parallel rank."""

    def __init__(self, task: Task, tokenizer: Any, *, rank: int = 0, world: int = 1, position: int = 0,
                 tools: list[dict] | None = None):
        self.task, self.tokenizer, self.tools = task, tokenizer, tools  # tools: listed by a chat template
        self.rank, self.world = rank, world
        self.position = position  # examples consumed by this rank

    def next(self, n: int) -> Prompts:
        indices = [(self.position + k) * self.world + self.rank for k in range(n)]
        self.position += n
        prompts = encode_prompts(self.task, self.tokenizer, [self.task.train_example(i) for i in indices], self.tools)
        prompts.indices = indices
        return prompts
