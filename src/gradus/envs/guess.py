"""The built-in guessing game as an environment (the rules are `gradus.tasks.guess`'s)."""

from __future__ import annotations

from typing import Any, ClassVar

from gradus.envs.base import BaseEnvironment, Step
from gradus.tasks import Example
from gradus.tasks.guess import RIGHT, answer_to


class GuessEnv(BaseEnvironment):
    """Answers each guess with its direction and the range still possible (or, with ``feedback=False``, only
    "no" and the first range: the control that shows whether a policy uses the answers); reward 1 and done when
    the guess is the secret. The state is (secret, low, high)."""

    name: ClassVar[str] = "guess"

    def __init__(self, feedback: bool = True) -> None:
        if not isinstance(feedback, bool):
            raise ValueError(f"feedback must be true or false, got {feedback!r}")
        self.feedback = feedback

    def reset(self, example: Example) -> Any:
        m = example.meta
        return int(m["secret"]), int(m["low"]), int(m["high"])

    def step(self, state: Any, action: str) -> Step:
        secret, low, high = state
        said, low, high = answer_to(secret, low, high, action, self.feedback)
        if said == RIGHT:
            return Step(said, reward=1.0, done=True, state=(secret, low, high), success=True)
        return Step(said, reward=0.0, done=False, state=(secret, low, high))
