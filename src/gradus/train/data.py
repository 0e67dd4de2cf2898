"""Where prompts come from during training: a task's training stream, as token ids.

The data position is one integer (the next example index), so a checkpoint stores it and a
resumed run continues exactly. Data-parallel rank r of w takes indices r, r + w, r + 2w, ...
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


def encode_prompts(task: Task, tokenizer: Any, examples: list[Example]) -> Prompts:
    """Render each example with the task's template (or the tokenizer's chat template) and tokenize."""
    texts = [task.render_prompt(ex, tokenizer) for ex in examples]
    # A chat template already holds whatever special tokens the model expects.
    special = not bool(getattr(tokenizer, "chat_template", None))
    ids = [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
    for text, row in zip(texts, ids, strict=True):
        if not row:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
    return Prompts(examples, texts, ids)


class PromptSource:
    """The training stream of a task for one data-parallel rank."""

    def __init__(self, task: Task, tokenizer: Any, *, rank: int = 0, world: int = 1, position: int = 0):
        self.task, self.tokenizer = task, tokenizer
        self.rank, self.world = rank, world
        self.position = position  # examples consumed by this rank

    def next(self, n: int) -> Prompts:
        indices = [(self.position + k) * self.world + self.rank for k in range(n)]
        self.position += n
        return encode_prompts(self.task, self.tokenizer, [self.task.train_example(i) for i in indices])
