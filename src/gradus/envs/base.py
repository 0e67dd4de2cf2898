"""What an environment is: a task whose episodes run over several turns.

An episode starts from a task example. The model acts (one completion, up to its EOS); the environment answers
with an observation, a reward and whether the episode is done; the model acts again on everything so far, and so
on, until the environment says done, `env.max_turns` turns have been taken, or the episode's token budget
(`env.max_tokens`) is spent. The episode's reward is the sum of its turns' rewards.

An environment keeps no state of its own between calls: `reset` returns the episode's state and `step` takes it
and returns the next one. The state must pickle, because every call runs in a worker process, under a time
limit, on whichever worker is free (`gradus.envs.calls`): an environment that hangs, raises or returns nonsense
ends its episode, flagged, never the run. An OpenEnv environment, which keeps its episode inside the object, is
wrapped by `gradus.envs.adapters` (its state: the turns so far, replayed on a worker that lacks the object).

Tools: an environment may name tools (`tools`: name -> function of one text argument, returning text). When the
model's turn holds a tool call (`gradus.envs.tools`), the call runs in a worker under the same time limit and its
result (or what went wrong: an error, a time-out, a malformed call) is the observation; `step` is called only
for turns without a tool call. So a tool environment's `step` sees the model's answers, and its tools see the
calls.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from gradus.tasks import Example

# what an environment answers: text (rendered as the next message of the conversation, or encoded as it is for
# a tokenizer without a chat template), or token ids (appended exactly as given), or None (nothing to add)
Observation = str | list[int] | None


@dataclass(frozen=True)
class Step:
    """An environment's answer to one turn of the model."""

    observation: Observation = None
    reward: float = 0.0
    done: bool = False
    state: Any = None
    success: bool | None = None
    """Whether the episode succeeded (for the success rate); None: decided by its total reward being >= 1."""


@runtime_checkable
class Environment(Protocol):
    """A multi-turn environment (module docstring). Built once per worker process with the options of
    `env.options`; the same object serves every episode, so it must keep per-episode data in the state."""

    name: ClassVar[str]
    tools: ClassVar[Mapping[str, Callable[[str], str]]]

    def reset(self, example: Example) -> Any:
        """The state of a new episode of `example` (the prompt is the task's, rendered as for one turn)."""
        ...

    def step(self, state: Any, action: str) -> Step:
        """The environment's answer to the model's turn `action` (decoded text, special tokens removed)."""
        ...


class BaseEnvironment:
    """Defaults for an environment: no tools, a state that is the example itself."""

    name: ClassVar[str] = "environment"
    tools: ClassVar[Mapping[str, Callable[[str], str]]] = {}

    def reset(self, example: Example) -> Any:
        return example

    def step(self, state: Any, action: str) -> Step:
        """Every environment answers the model's turns itself (`load_env_class` refuses one that does not)."""
        raise TypeError(f"{type(self).__name__} does not define step: an environment must answer the model's turns")


class BadStep(ValueError):
    """An environment's answer that is not a usable `Step`."""


def check_step(step: Any) -> Step:
    """`step` as a `Step` whose fields are usable: raise BadStep saying which field is wrong."""
    if not isinstance(step, Step):
        raise BadStep(f"step returned {type(step).__name__}, not gradus.envs.Step")
    obs = step.observation
    if not (obs is None or isinstance(obs, str)
            or (isinstance(obs, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in obs))):
        raise BadStep(f"the observation is a {type(obs).__name__}: it must be text, a list of token ids, or None")
    if isinstance(step.reward, bool) or not isinstance(step.reward, (int, float)) or not math.isfinite(step.reward):
        raise BadStep(f"the reward is {step.reward!r}: it must be a finite number")
    if not isinstance(step.done, bool):
        raise BadStep(f"done is {step.done!r}: it must be True or False")
    if step.success is not None and not isinstance(step.success, bool):
        raise BadStep(f"success is {step.success!r}: it must be True, False or None")
    check_state(step.state)
    return step


def check_state(state: Any) -> None:
    """The state must pickle: it travels between the worker processes that run an episode's calls."""
    try:
        pickle.dumps(state)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the environment's error
        raise BadStep(f"the state does not pickle ({type(exc).__name__}: {exc}); keep plain data in it") from None
