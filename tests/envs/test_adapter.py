"""OpenEnvAdapter: a small OpenEnv game (a number to guess in at most 6 tries), written in OpenEnv's own API,
played through the gradus protocol; replay on another worker; what a broken OpenEnv environment becomes.

They need openenv-core and skip without it (`pip install -e ".[openenv]"`); what a missing install gives is a
fault case (`tests/faults/test_envs.py`)."""

from __future__ import annotations

import multiprocessing
import pickle
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from gradus.envs import Environment, check_step
from gradus.envs.adapters import OpenEnvAdapter, OpenEnvError, OpenEnvState
from gradus.tasks import Example

openenv_types = pytest.importorskip("openenv.core.env_server.types")
openenv_interfaces = pytest.importorskip("openenv.core.env_server.interfaces")


class GuessAction(openenv_types.Action):
    guess: str


class GuessObservation(openenv_types.Observation):
    feedback: str = ""


class GuessGame(openenv_interfaces.Environment):
    """A secret number in 1..top drawn from reset's seed; each guess gets "higher", "lower" or "correct".
    A correct guess pays 1 and ends the episode; a guess that is not a number costs 0.5; 6 guesses end it."""

    SUPPORTS_CONCURRENT_SESSIONS = True
    built = 0  # objects built, over the process: tells a replay from a live step
    steps = 0

    def __init__(self, top: int = 100):
        super().__init__()
        GuessGame.built += 1
        self.top = top
        self._state = openenv_types.State()

    def reset(self, seed=None, episode_id=None, **kwargs):
        self.secret = self.draw(seed)
        self._state = openenv_types.State(episode_id=episode_id, step_count=0)
        return GuessObservation(feedback=f"Guess my number in 1..{self.top}.")

    def draw(self, seed):
        return random.Random(seed).randint(1, self.top)

    def step(self, action, timeout_s=None, **kwargs):
        GuessGame.steps += 1
        self._state.step_count += 1
        out_of_turns = self._state.step_count >= 6
        text = action.guess.strip()
        if not text.isdigit():
            return GuessObservation(feedback="Say a number.", reward=-0.5, done=out_of_turns)
        guess = int(text)
        if guess == self.secret:
            return GuessObservation(feedback="correct", reward=1.0, done=True)
        return GuessObservation(feedback="higher" if guess < self.secret else "lower", reward=0.0,
                                done=out_of_turns)

    @property
    def state(self):
        return self._state


class Guess(OpenEnvAdapter):
    name = "guess"
    env_class = GuessGame
    action_class = GuessAction
    action_field = "guess"
    observation_field = "feedback"


def secret_of(state: OpenEnvState, top: int = 100) -> int:
    """The secret as the game draws it: Python's Random seeded with the adapter's seed."""
    return random.Random(state.reset_kwargs["seed"]).randint(1, top)


EXAMPLE = Example(prompt="Guess the number.", answer="", meta={"seed": 7})


def play(env, state, guesses):
    steps = []
    for guess in guesses:
        step = check_step(env.step(state, guess))
        steps.append(step)
        state = step.state
    return steps


def test_an_episode_of_several_turns_gives_the_games_answers_rewards_and_done():
    env = Guess()
    assert isinstance(env, Environment)
    state = env.reset(EXAMPLE)
    assert state.reset_kwargs == {"seed": 7} and state.first_observation == "Guess my number in 1..100."
    secret = secret_of(state)
    # a wrong number below, a non-number, a wrong number above, then the secret: 4 turns
    guesses = [str(secret - 1), "fifty", str(secret + 1), str(secret)]
    steps = play(env, state, guesses)
    assert [s.observation for s in steps] == ["higher", "Say a number.", "lower", "correct"]
    assert [s.reward for s in steps] == [0.0, -0.5, 0.0, 1.0]
    assert [s.done for s in steps] == [False, False, False, True]
    assert steps[-1].state.actions == tuple(guesses) and steps[-1].state.done
    with pytest.raises(OpenEnvError, match="is done; it takes no more turns"):
        env.step(steps[-1].state, str(secret))


def test_the_games_turn_limit_ends_the_episode():
    env = Guess()
    steps = play(env, env.reset(EXAMPLE), ["x"] * 6)
    assert [s.done for s in steps] == [False] * 5 + [True]
    assert sum(s.reward for s in steps) == -3.0  # 6 non-numbers at -0.5


def test_the_seed_is_the_examples_and_the_same_for_every_episode_of_it():
    env = Guess()
    no_seed = Example(prompt="Guess the number.", answer="42")
    a, b = env.reset(no_seed), env.reset(no_seed)
    assert a.episode_id != b.episode_id and a.reset_kwargs == b.reset_kwargs  # a group shares the problem
    assert 0 <= a.reset_kwargs["seed"] < 2**31
    assert env.reset(Example(prompt="Guess another.", answer="42")).reset_kwargs != a.reset_kwargs


def test_every_state_pickles_and_another_worker_continues_it_by_replay():
    here, there = Guess(), Guess()  # two workers: each holds its own live OpenEnv objects
    state = here.reset(EXAMPLE)
    secret = secret_of(state)
    first = here.step(pickle.loads(pickle.dumps(state)), str(secret - 2))
    built, steps = GuessGame.built, GuessGame.steps
    # the worker that played turn 1 steps its live object: no new object, one step
    second = here.step(pickle.loads(pickle.dumps(first.state)), str(secret + 3))
    assert (GuessGame.built, GuessGame.steps) == (built, steps + 1)
    # another worker rebuilds the episode: one new object, turns 1 and 2 replayed, then turn 3
    third = there.step(pickle.loads(pickle.dumps(second.state)), str(secret))
    assert (GuessGame.built, GuessGame.steps) == (built + 1, steps + 4)
    assert [first.observation, second.observation, third.observation] == ["higher", "lower", "correct"]
    assert third.done and third.reward == 1.0


def test_a_retried_turn_rebuilds_the_episode_instead_of_stepping_on():
    env = Guess()
    first = env.step(env.reset(EXAMPLE), "x")
    play(env, first.state, ["x"] * 4)  # the live object has played 5 turns: its next one is the last
    again = env.step(first.state, "y")  # turn 2 again, from turn 1's state
    assert not again.done and again.state.actions == ("x", "y")


def run_step(env_state_action):
    env, state, action = env_state_action
    return env.step(state, action), len(env.live_before_step)


class Watched(Guess):
    """Guess that remembers which live objects it held before its last step."""

    def step(self, state, action):
        self.live_before_step = dict(self.live)
        return super().step(state, action)


def test_turns_alternate_between_processes():
    # fork: the child has this module's classes; the adapter, the state and the step go through pickle
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    with pool:
        env = Watched()
        state = env.reset(EXAMPLE)
        secret = secret_of(state)
        first, live_there = pool.submit(run_step, (env, state, str(secret + 5))).result()
        assert live_there == 0 and len(env.live) == 1  # the copy sent over came without the live objects
        second = env.step(first.state, str(secret - 5))
        third, _ = pool.submit(run_step, (env, second.state, str(secret))).result()
        assert [first.observation, second.observation, third.observation] == ["lower", "higher", "correct"]


class UnseededGame(GuessGame):
    """Ignores the seed: its secret is 1 and 100 in turn, so a replay meets the other one."""

    draw_count = 0

    def draw(self, seed):
        UnseededGame.draw_count += 1
        return 1 if UnseededGame.draw_count % 2 else 100


class Unseeded(Guess):
    env_class = UnseededGame


def test_an_environment_that_does_not_replay_the_same_is_an_error():
    here, there = Unseeded(), Unseeded()
    state = here.reset(EXAMPLE)
    first = here.step(state, "50")
    assert here.step(first.state, "50").observation == first.observation  # the live object: fine
    with pytest.raises(OpenEnvError, match="not deterministic given its reset arguments"):
        there.step(first.state, "50")


class RaisingGame(GuessGame):
    def step(self, action, timeout_s=None, **kwargs):
        if action.guess == "boom":
            raise KeyError("the board has no square boom")
        return super().step(action, timeout_s)


class Raising(Guess):
    env_class = RaisingGame


class BrokenResetGame(GuessGame):
    def reset(self, seed=None, episode_id=None, **kwargs):
        raise RuntimeError("no puzzles left")


class BrokenReset(Guess):
    env_class = BrokenResetGame


class DictGame(GuessGame):
    def step(self, action, timeout_s=None, **kwargs):
        return {"feedback": "higher", "reward": 0.0}


class ReturnsDict(Guess):
    env_class = DictGame


class WrongField(Guess):
    observation_field = "reward"  # a number, not text


class WrongAction(Guess):
    action_field = "message"  # GuessAction has no such field


@pytest.mark.parametrize("adapter, action, problem", [
    (Raising, "boom", "step at turn 1, raised KeyError: 'the board has no square boom'"),
    (ReturnsDict, "1", "step at turn 1, returned a dict, not an openenv Observation"),
    (WrongField, "1", "step at turn 1, observation field 'reward' is a float: it must be text"),
    (WrongAction, "1", "building its action at turn 1, raised ValidationError: 2 validation errors"),
])
def test_a_broken_environment_is_an_error_of_one_line_that_pickles(adapter, action, problem):
    env = adapter()
    state = env.reset(EXAMPLE)  # reset's observation is fine in each (WrongField: its reward is None)
    with pytest.raises(OpenEnvError) as caught:
        env.step(state, action)
    message = str(caught.value)
    assert message.startswith(f"guess: OpenEnv environment {adapter.env_class.__name__}, {problem}")
    assert "\n" not in message
    # a worker sends it back to the trainer through pickle
    assert str(pickle.loads(pickle.dumps(caught.value))) == message


def test_a_failing_reset_is_an_error_naming_the_start():
    with pytest.raises(OpenEnvError, match="reset at the episode's start, raised RuntimeError: no puzzles left"):
        BrokenReset().reset(EXAMPLE)


def test_a_failed_step_drops_the_live_object():
    env = Raising()
    state = env.reset(EXAMPLE)
    with pytest.raises(OpenEnvError):
        env.step(state, "boom")
    assert state.episode_id not in env.live  # a half-changed object is not stepped again
    built = GuessGame.built
    assert env.step(state, "3").observation in {"higher", "lower", "correct"}
    assert GuessGame.built == built + 1  # rebuilt by replay


class LoneGame(GuessGame):
    SUPPORTS_CONCURRENT_SESSIONS = False
    closed = 0

    def close(self):
        LoneGame.closed += 1


class Lone(Guess):
    env_class = LoneGame


def test_a_non_concurrent_environment_has_one_live_object_per_worker():
    env = Lone()
    a, b = env.reset(EXAMPLE), env.reset(Example(prompt="other", answer=""))
    assert LoneGame.closed == 1 and list(env.live) == [b.episode_id]  # a's object closed before b's was built
    secret = secret_of(a)
    step = env.step(a, str(secret))  # a is rebuilt by replay (closing b's), then plays
    assert step.observation == "correct" and LoneGame.closed == 3  # b's, then a's when its episode ended
    assert not env.live


class BoolRewardGame(GuessGame):
    def step(self, action, timeout_s=None, **kwargs):
        return GuessObservation(feedback="ok", reward=True, done=True)


class BoolReward(Guess):
    env_class = BoolRewardGame


def test_a_bool_reward_counts_one_and_options_reach_the_environment():
    step = check_step(BoolReward().step(BoolReward().reset(EXAMPLE), "1"))
    assert step.reward == 1.0 and type(step.reward) is float
    state = Guess(top=3).reset(EXAMPLE)  # env.options go to the OpenEnv class
    assert state.first_observation == "Guess my number in 1..3."
