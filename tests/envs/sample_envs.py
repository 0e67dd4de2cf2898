"""Environments for the tests, loaded by file path ("tests/envs/sample_envs.py:Class") in the workers."""

import math
import time

from gradus.envs import BaseEnvironment, Step


class OneTurn(BaseEnvironment):
    """Ends after the first turn: reward 1 when the turn holds a digit (as a one-turn reward would score it)."""

    name = "one_turn"

    def step(self, state, action):
        return Step(None, reward=float(any(ch.isdigit() for ch in action)), done=True)


class Counter(BaseEnvironment):
    """Never done: answers "#k:" to the k-th turn and pays 0.25 for each."""

    name = "counter"

    def reset(self, example):
        return 0

    def step(self, state, action):
        return Step(f"#{state + 1}:", reward=0.25, done=False, state=state + 1)


class Raising(BaseEnvironment):
    name = "raising"

    def step(self, state, action):
        raise RuntimeError("the environment broke")


class Hanging(BaseEnvironment):
    name = "hanging"

    def step(self, state, action):
        time.sleep(3600)


class BadObservation(BaseEnvironment):
    name = "bad_observation"

    def step(self, state, action):
        return Step({"text": action}, reward=0.0)


class NanReward(BaseEnvironment):
    name = "nan_reward"

    def step(self, state, action):
        return Step("ok:", reward=math.nan)


class Flood(BaseEnvironment):
    """Answers with more text than any episode's budget holds."""

    name = "flood"

    def step(self, state, action):
        return Step("x" * 5000, reward=0.0)


def _calc(argument):
    """Evaluates an arithmetic expression of integers."""
    allowed = set("0123456789+-*/() ")
    if not set(argument) <= allowed:
        raise ValueError(f"not arithmetic: {argument!r}")
    return str(eval(argument))  # noqa: S307 - digits and operators only


def _boom(argument):
    raise ZeroDivisionError("boom")


def _sleep(argument):
    time.sleep(3600)
    return "never"


class Tools(BaseEnvironment):
    """A calculator and two hostile tools; the answer is right when the turn (without a tool call) says 42."""

    name = "tools"
    tools = {"calc": _calc, "boom": _boom, "sleep": _sleep}

    def step(self, state, action):
        right = action.strip() == "42"
        return Step("wrong:" if not right else None, reward=float(right), done=right, success=right)


class Digits(BaseEnvironment):
    """Two turns, each paid by its share of digits (an untrained model's groups then differ in reward)."""

    name = "digits"

    def reset(self, example):
        return 0

    def step(self, state, action):
        reward = sum(ch.isdigit() for ch in action) / 10
        return Step("more:", reward=reward, done=state == 1, state=state + 1)


class DigitsVaried(BaseEnvironment):
    """As Digits, but an episode lasts 1, 2 or 3 turns, by its prompt's length (so turn counts differ by example)."""

    name = "digits_varied"

    def reset(self, example):
        return (0, 1 + len(example.prompt) % 3)

    def step(self, state, action):
        turn, turns = state
        reward = sum(ch.isdigit() for ch in action) / 10
        return Step("more:", reward=reward, done=turn + 1 >= turns, state=(turn + 1, turns))
