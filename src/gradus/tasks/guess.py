"""Guess the number: a multi-turn game whose answers the model needs in order to win.

A secret integer lies in a range shown in the prompt (``"guess 23-37:"``). Each turn the model says a number;
the environment (`gradus.envs.guess`) answers with the direction and the range still possible
(``"higher 31-37:"``, ``"lower 23-29:"``) until the model names the secret (reward 1) or runs out of turns
(reward 0). Ranges hold 8 to 15 numbers, so halving the range wins within four turns (the default
`env.max_turns`); guessing uniformly within the range still possible wins 71% of the time, and guessing without
the answers (``feedback=False``: the environment only says ``"no 23-37:"``) at most a quarter to a half.

The warm start imitates the uniform player: it learns the format and to stay inside the range it is told; RL has
to find that the middle of that range wins more often.
"""

from __future__ import annotations

import random

from gradus.tasks.base import Example, ProceduralTask

RIGHT = "yes"


def answer_to(secret: int, low: int, high: int, guess_text: str, feedback: bool = True) -> tuple[str, int, int]:
    """What the game says to one guess when ``low``-``high`` is still possible, and the range possible after it
    (the guess was right when the answer is ``RIGHT``). ``feedback=False`` says neither direction nor range."""
    text = guess_text.strip()
    if not text.isdigit() or len(text) > 6:
        return f"a number {low}-{high}:", low, high
    guess = int(text)
    if guess == secret:
        return RIGHT, guess, guess
    if not feedback:
        return f"no {low}-{high}:", low, high
    if secret > guess:
        low = max(low, guess + 1)
        return f"higher {low}-{high}:", low, high
    high = min(high, guess - 1)
    return f"lower {low}-{high}:", low, high


class GuessTask(ProceduralTask):
    """Guess-the-number problems; meta holds ``low``, ``high`` and ``secret`` (see the module docstring)."""

    name = "guess"
    default_reward = "exact_match"  # a one-turn reading (the number itself); runs use the environment
    default_env = "guess"
    version = 1  # part of the warm start's cache key: change it when the game's texts or demonstrations change

    def __init__(self, seed: int = 0, max_low: int = 80, min_width: int = 8, max_width: int = 15,
                 heldout_fraction: float = 0.1, heldout_size: int = 200, heldout_seed: int = 1234) -> None:
        if not 1 <= min_width <= max_width:
            raise ValueError(f"need 1 <= min_width <= max_width, got {min_width}, {max_width}")
        super().__init__(seed, heldout_fraction, heldout_size, heldout_seed)
        self.max_low, self.min_width, self.max_width = max_low, min_width, max_width

    def generate(self, rng: random.Random) -> Example:
        low = rng.randint(1, self.max_low)
        high = low + rng.randint(self.min_width, self.max_width) - 1
        secret = rng.randint(low, high)
        return Example(prompt=f"guess {low}-{high}:", answer=str(secret),
                       meta={"low": low, "high": high, "secret": secret})

    def problem_key(self, example: Example) -> str:
        m = example.meta
        return f"{m['low']}-{m['high']}:{m['secret']}"

    def demonstration(self, example: Example, rng: random.Random, max_turns: int) -> list[tuple[str, bool]]:
        """A warm-start episode: (text, spoken by the model) pieces after the prompt, up to ``max_turns`` guesses,
        each drawn uniformly from the range the game last said (module docstring)."""
        low, high, secret = example.meta["low"], example.meta["high"], example.meta["secret"]
        pieces: list[tuple[str, bool]] = []
        for turn in range(max_turns):
            guess = rng.randint(low, high)
            pieces.append((str(guess), True))
            said, low, high = answer_to(secret, low, high, str(guess))
            if said == RIGHT or turn == max_turns - 1:
                break
            pieces.append((said, False))
        return pieces
