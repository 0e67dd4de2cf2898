"""The built-in guessing game as an environment (the rules are `gradus.tasks.guess`'s)."""

from __future__ import annotations

from typing import Any, ClassVar

from gradus.envs.base import BaseEnvironment, Step
from gradus.tasks import Example
from gradus.tasks.guess import answer_to


class GuessEnv(BaseEnvironment):
    """Answers each guess with "higher:"/"lower:" (or, with ``feedback=False``, only "no:", the control that
    shows whether a policy uses the answers); reward 1 and done when the guess is the secret."""

    name: ClassVar[str] = "guess"

    def __init__(self, feedback: bool = True) -> None:
        if not isinstance(feedback, bool):
            raise ValueError(f"feedback must be true or false, got {feedback!r}")
        self.feedback = feedback

    def reset(self, example: Example) -> Any:
        return int(example.meta["secret"])

    def step(self, state: Any, action: str) -> Step:
        said, right = answer_to(state, action, self.feedback)
        if right:
            return Step(said, reward=1.0, done=True, state=state, success=True)
        return Step(said, reward=0.0, done=False, state=state)
