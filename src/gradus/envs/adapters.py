"""An OpenEnv environment (openenv-core 0.3.0, `pip install -e ".[openenv]"`) as a gradus environment.

OpenEnv's environments are Gym-style objects: `reset(seed=, episode_id=) -> Observation`, then
`step(Action) -> Observation`, whose `reward` and `done` fields end a turn; the episode's data lives inside
the object. gradus keeps an episode's data in a state that pickles, because each call may run on another
worker process (`gradus.envs.base`). So the adapter's state is plain data (`OpenEnvState`): the reset
arguments, the model's turns so far, and a digest of each answer the environment gave. The worker that
answered the previous turn still holds the live OpenEnv object and steps it; any other worker rebuilds it by
resetting with the same arguments and replaying the turns, and checks each replayed answer against its
digest: an environment whose answers are not fixed by its reset arguments (an unseeded random draw) raises
`OpenEnvError` instead of continuing a different episode than the model saw.

Everything the OpenEnv code raises or returns wrongly becomes an `OpenEnvError`: one line naming the class,
the call and the turn, built from text only so that it pickles back from a worker (a pydantic
ValidationError, for one, does not).

Departures from OpenEnv's own runner (its HTTP server, `openenv.core.env_server.http_server`):
1. No server: the environment runs in the worker process, called through `reset` and `step` directly.
2. The reset observation is not shown to the model: a gradus episode opens with the task's prompt. Its text
   is kept in `OpenEnvState.first_observation` for a task that wants to render it.
3. A reward of None (OpenEnv's "no reward this step") counts 0.0; a bool reward counts 1.0 or 0.0.
"""

from __future__ import annotations

import hashlib
import inspect
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from gradus.envs.base import BaseEnvironment, Step
from gradus.tasks import Example

OPENENV_VERSION = "0.3.0"  # the openenv-core release pinned by pyproject's `openenv` extra, and tested
INSTALL_HINT = f'pip install -e ".[openenv]" (openenv-core=={OPENENV_VERSION})'


class OpenEnvError(RuntimeError):
    """What went wrong inside an OpenEnv environment, as one line of text (it pickles)."""


def import_openenv_types() -> Any:
    """openenv's `types` module (Action, Observation), imported on first use: gradus runs without it."""
    try:
        from openenv.core.env_server import types
    except ImportError as exc:
        # one line either way: not installed, or installed with a dependency that does not import
        raise ImportError(f"OpenEnv environments need openenv-core, which does not import here ({one_line(exc)}): "
                          f"{INSTALL_HINT}") from None
    return types


@dataclass(frozen=True)
class OpenEnvState:
    """One episode of an OpenEnv environment, as plain data (module docstring)."""

    episode_id: str
    reset_kwargs: dict[str, Any]
    first_observation: str | None = None
    actions: tuple[str, ...] = ()
    # one digest per answer (reset's first), so a replay can tell that it rebuilt the same episode
    digests: tuple[str, ...] = ()
    done: bool = False


@dataclass
class LiveEpisode:
    """An OpenEnv object that has played `actions` of an episode, kept by the worker that played them."""

    env: Any
    actions: tuple[str, ...] = field(default=())


def answer_digest(text: str | None, reward: float, done: bool) -> str:
    return hashlib.blake2b(repr((text, reward, done)).encode(), digest_size=12).hexdigest()


def accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether `function` takes a keyword argument `name` (by name or through **kwargs)."""
    params = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class OpenEnvAdapter(BaseEnvironment):
    """An OpenEnv environment class as a gradus environment. Subclass it and set `env_class`,
    `action_class`, `action_field` and `observation_field`; override `reset_kwargs`, `make_action` or
    `observation_text` where the defaults do not fit. The options of `env.options` go to `env_class(...)`."""

    name: ClassVar[str] = "openenv"
    env_class: ClassVar[type | None] = None
    """The OpenEnv `Environment` subclass; `env_class(**options)` builds one object per live episode."""
    action_class: ClassVar[type | None] = None
    """The environment's `Action` subclass: the model's turn becomes `action_class(**{action_field: text})`."""
    action_field: ClassVar[str] = "message"
    observation_field: ClassVar[str] = "message"
    """The field of the environment's observation that is shown to the model (it must hold text)."""
    live_episodes: ClassVar[int] = 64
    """How many live OpenEnv objects a worker keeps (older ones are closed and rebuilt by replay if needed);
    1 for an environment whose class says SUPPORTS_CONCURRENT_SESSIONS = False."""

    def __init__(self, **options: Any) -> None:
        types = import_openenv_types()
        self.action_base, self.observation_base = types.Action, types.Observation
        cls = type(self).__name__
        if self.env_class is None or self.action_class is None:
            raise TypeError(f"{cls}: set env_class and action_class (the OpenEnv Environment and its Action)")
        self.options = options
        concurrent = getattr(self.env_class, "SUPPORTS_CONCURRENT_SESSIONS", True)
        self.capacity = self.live_episodes if concurrent is not False else 1
        self.live: OrderedDict[str, LiveEpisode] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # the live objects are a cache (a replay rebuilds them) and need not pickle: a copy sent to a
        # worker process starts without them
        return {**self.__dict__, "live": OrderedDict()}

    # --- what a subclass may override ------------------------------------------------------------------

    def reset_kwargs(self, example: Example) -> dict[str, Any]:
        """The arguments of the OpenEnv reset for `example`, beside `episode_id`: its seed, which fixes the
        problem, the same for every episode of the example (a group). `meta["seed"]` if the task gives one,
        else a hash of the prompt and answer. Nothing if the environment's reset takes no seed."""
        if not accepts(self.env_class.reset, "seed"):
            return {}
        seed = example.meta.get("seed")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            digest = hashlib.blake2b(f"{example.prompt}\0{example.answer}".encode(), digest_size=4).digest()
            seed = int.from_bytes(digest, "big") >> 1  # < 2**31: every seeding API takes it
        return {"seed": seed}

    def make_action(self, text: str) -> Any:
        return self.action_class(**{self.action_field: text})

    def observation_text(self, observation: Any) -> str | None:
        return getattr(observation, self.observation_field)

    # --- the gradus protocol ---------------------------------------------------------------------------

    def reset(self, example: Example) -> OpenEnvState:
        state = OpenEnvState(episode_id=uuid.uuid4().hex, reset_kwargs=dict(self.reset_kwargs(example)))
        env, first = self.start(state)
        text, reward, done = self.answer(first, "reset", 0)
        state = replace(state, first_observation=text, digests=(answer_digest(text, reward, done),))
        self.keep(state.episode_id, LiveEpisode(env))
        return state

    def step(self, state: OpenEnvState, action: str) -> Step:
        if not isinstance(state, OpenEnvState):
            raise OpenEnvError(f"{self.name}: step got a {type(state).__name__}, not the OpenEnvState of reset")
        if state.done:
            raise OpenEnvError(f"{self.name}: episode {state.episode_id} is done; it takes no more turns")
        turn = len(state.actions) + 1
        live = self.live.pop(state.episode_id, None)
        if live is None or live.actions != state.actions:
            if live is not None:  # it has played other turns than this state's (a retried call)
                self.close(live.env)
            live = self.rebuild(state)
        try:
            observation = self.call("step", turn, live.env.step, self.build_action(action, turn))
            text, reward, done = self.answer(observation, "step", turn)
        except BaseException:
            self.close(live.env)  # a failed step may leave the object half-changed: rebuild it next time
            raise
        digest = answer_digest(text, reward, done)
        state = replace(state, actions=(*state.actions, action), digests=(*state.digests, digest), done=done)
        if done:
            self.close(live.env)
        else:
            self.keep(state.episode_id, LiveEpisode(live.env, state.actions))
        return Step(observation=text, reward=reward, done=done, state=state)

    # --- building, replaying and keeping OpenEnv objects --------------------------------------------------

    def start(self, state: OpenEnvState) -> tuple[Any, Any]:
        """A fresh OpenEnv object reset for `state`'s episode, and its reset observation."""
        while len(self.live) >= self.capacity:  # a non-concurrent class: the previous object goes first
            self.close(self.live.popitem(last=False)[1].env)
        env = self.call("building it", 0, self.env_class, **self.options)
        kwargs = dict(state.reset_kwargs)
        if accepts(env.reset, "episode_id"):
            kwargs["episode_id"] = state.episode_id
        try:
            return env, self.call("reset", 0, env.reset, **kwargs)
        except BaseException:
            self.close(env)
            raise

    def rebuild(self, state: OpenEnvState) -> LiveEpisode:
        """The OpenEnv object of `state`'s episode on a worker that does not hold it: reset and replay."""
        env, first = self.start(state)
        try:
            self.same_as_played(state, 0, first, "reset")
            for turn, text in enumerate(state.actions, start=1):
                observation = self.call("step (replay)", turn, env.step, self.build_action(text, turn))
                self.same_as_played(state, turn, observation, "step (replay)")
        except BaseException:
            self.close(env)
            raise
        return LiveEpisode(env, state.actions)

    def same_as_played(self, state: OpenEnvState, turn: int, observation: Any, what: str) -> None:
        if answer_digest(*self.answer(observation, what, turn)) != state.digests[turn]:
            raise OpenEnvError(
                f"{self.name}: replaying turn {turn} of episode {state.episode_id} on another worker gave another "
                f"answer than the first time (reset arguments {state.reset_kwargs}): the environment is not "
                "deterministic given its reset arguments; draw every random choice from reset's seed")

    def keep(self, episode_id: str, live: LiveEpisode) -> None:
        self.live[episode_id] = live
        while len(self.live) > self.capacity:
            self.close(self.live.popitem(last=False)[1].env)

    def close(self, env: Any) -> None:
        # close() frees the object's resources; its failure must not hide the error being reported
        try:
            env.close()
        except Exception:  # noqa: BLE001 - best effort, the object is dropped either way
            pass

    # --- calls into OpenEnv code, each failure one line ----------------------------------------------

    def call(self, what: str, turn: int, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - anything the environment raises is reported, not hidden
            raise self.error(what, turn, f"raised {type(exc).__name__}: {one_line(exc)}") from None

    def build_action(self, text: str, turn: int) -> Any:
        action = self.call("building its action", turn, self.make_action, text)
        if not isinstance(action, self.action_base):
            raise self.error("building its action", turn, f"gave a {type(action).__name__}, not an openenv Action")
        return action

    def answer(self, observation: Any, what: str, turn: int) -> tuple[str | None, float, bool]:
        """The text, reward and done of an OpenEnv observation, or what is wrong with it."""
        if not isinstance(observation, self.observation_base):
            raise self.error(what, turn, f"returned a {type(observation).__name__}, not an openenv Observation")
        text = self.call(f"{what}: reading its observation", turn, self.observation_text, observation)
        if not (text is None or isinstance(text, str)):
            raise self.error(what, turn, f"observation field {self.observation_field!r} is a "
                             f"{type(text).__name__}: it must be text (set observation_field)")
        # pydantic has checked that reward is a bool, an int, a float or None, and done a bool
        reward = 0.0 if observation.reward is None else float(observation.reward)
        return text, reward, observation.done

    def error(self, what: str, turn: int, problem: str) -> OpenEnvError:
        env_name = getattr(self.env_class, "__name__", repr(self.env_class))
        where = f"turn {turn}" if turn else "the episode's start"
        return OpenEnvError(f"{self.name}: OpenEnv environment {env_name}, {what} at {where}, {problem}")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 300 characters (a pydantic error runs over many)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."

