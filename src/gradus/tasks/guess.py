"""Guess the number: a multi-turn game whose answers the model needs in order to win.

A secret integer lies in a range shown in the prompt (``"guess 23-37:"``). Each turn the model says a number;
the environment (`gradus.envs.guess`) answers ``"higher:"`` or ``"lower:"`` until the model names the secret
(reward 1) or runs out of turns (reward 0). Ranges hold 8 to 15 numbers, so halving the range wins within four
turns (the default `env.max_turns`), while guessing without the answers wins a quarter to a half of the time.

The warm start imitates a player who uses the answers but not well: each guess is drawn uniformly from the
numbers the answers so far allow. It learns the format and the rule (stay inside what is still possible); RL
has to find that the middle of that range wins more often.
"""

from __future__ import annotations

import random

from gradus.tasks.base import Example, ProceduralTask

HIGHER, LOWER, RIGHT, INVALID, NO = "higher:", "lower:", "yes", "a number please:", "no:"


def answer_to(secret: int, guess_text: str, feedback: bool = True) -> tuple[str, bool]:
    """What the game says to one guess, and whether it was right. ``feedback=False`` withholds the direction."""
    text = guess_text.strip()
    if not text.isdigit() or len(text) > 6:
        return INVALID, False
    guess = int(text)
    if guess == secret:
        return RIGHT, True
    if not feedback:
        return NO, False
    return (HIGHER if secret > guess else LOWER), False


class GuessTask(ProceduralTask):
    """Guess-the-number problems; meta holds ``low``, ``high`` and ``secret`` (see the module docstring)."""

    name = "guess"
    default_reward = "exact_match"  # a one-turn reading (the number itself); runs use the environment
    default_env = "guess"

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
        each drawn uniformly from what the answers so far allow (module docstring)."""
        low, high, secret = example.meta["low"], example.meta["high"], example.meta["secret"]
        pieces: list[tuple[str, bool]] = []
        for turn in range(max_turns):
            guess = rng.randint(low, high)
            pieces.append((str(guess), True))
            said, right = answer_to(secret, str(guess))
            if right or turn == max_turns - 1:
                break
            pieces.append((said, False))
            low, high = (guess + 1, high) if said == HIGHER else (low, guess - 1)
        return pieces
