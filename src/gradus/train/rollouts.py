"""How a run's completions are sampled and scored: one completion per prompt, or multi-turn episodes.

Both kinds give the training step what it needs, a `RolloutBatch` and its `Scores`, and the evaluation its
success rate; the step does not ask which kind it has (`make_rollout` picks it from the config, once):

- `OneTurn`: the engine samples a completion per row; the task's rewards score the decoded text in the reward
  workers (stages rollout, score).
- `Episodes`: the engine and an environment take turns (`gradus.envs.episodes`); the reward is the sum of the
  environment's turn rewards, success the environment's verdict (one stage, rollout; the environment's share of
  it is `env/env_s`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from gradus.config import ConfigError, TrainConfig
from gradus.envs.calls import EnvCalls
from gradus.envs.episodes import EpisodeRunner, Limits
from gradus.rewards import parse_reward_specs
from gradus.rollout import RolloutBatch, RolloutEngine, SamplingParams
from gradus.rollout.local import model_positions
from gradus.rollout.registry import engine_class
from gradus.tasks import Example, Task
from gradus.train.data import Prompts, encode_prompts
from gradus.train.evaluate import evaluate
from gradus.train.scoring import Scorer, Scores
from gradus.train.stages import StageTimer


def env_spec(cfg: TrainConfig, task: Task) -> str | None:
    """The environment a run's episodes use: env.name, else the task's own; None: one turn."""
    return cfg.env.name or getattr(task, "default_env", None)


def env_options(cfg: TrainConfig) -> dict[str, Any]:
    if not cfg.env.options:
        return {}
    try:
        options = json.loads(cfg.env.options)
    except json.JSONDecodeError as err:
        raise ConfigError(f"env.options: not JSON ({err})") from None
    if not isinstance(options, dict):
        raise ConfigError("env.options: must be a JSON object of keyword arguments")
    return options


def make_rollout(cfg: TrainConfig, task: Task, workers: int | None = None) -> OneTurn | Episodes:
    """The run's kind of rollout; its worker processes start here, before any model is loaded, so a reward or
    an environment that cannot be built is a ConfigError first."""
    spec = env_spec(cfg, task)
    if spec is None:
        try:
            return OneTurn(Scorer(task, parse_reward_specs(cfg.task.rewards, task.default_reward),
                                  timeout_s=cfg.task.reward_timeout_s, strict=cfg.task.strict_rewards,
                                  workers=workers))
        except ValueError as err:
            raise ConfigError(f"task.rewards: {err}") from err
    try:
        calls = EnvCalls(spec, env_options(cfg), timeout_s=cfg.env.timeout_s, workers=workers)
    except ValueError as err:
        raise ConfigError(f"env.name: {err}") from err
    return Episodes(calls, cfg.env.max_turns, cfg.env.max_tokens, engine_class(cfg.rollout.engine).max_positions(cfg))


class OneTurn:
    """One completion per prompt, scored by the task's rewards."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.tokenizer: Any = None

    def bind(self, tokenizer: Any, model: torch.nn.Module) -> None:
        self.tokenizer = tokenizer

    def pids(self) -> list[int]:
        return self.scorer.reward.pool.pids()

    def prompt_tools(self) -> list[dict] | None:
        """Tools a chat template lists in the prompt: none for one completion."""
        return None

    def close(self) -> None:
        self.scorer.close()

    def overlong_limit(self, params: SamplingParams) -> int:
        """L_max of DAPO's overlong shaping: the completion's length limit."""
        return params.max_new_tokens

    def sample(self, engine: RolloutEngine, prompts: Prompts, n: int, params: SamplingParams, seeds: list[int],
               timer: StageTimer) -> tuple[RolloutBatch, list[Example], Scores]:
        with timer("rollout"):
            batch = engine.generate(prompts.ids, n, params, seeds=seeds)
        rows = batch.prompt_index.tolist()
        examples = [prompts.examples[i] for i in rows]
        with timer("score"):
            texts = self.scorer.completions_text(batch, self.tokenizer)
            scores = self.scorer.score([prompts.texts[i] for i in rows], texts, examples)
        return batch, examples, scores

    def evaluate(self, engine: RolloutEngine, task: Task, examples: list[Example], max_new_tokens: int) -> dict:
        return evaluate(engine, self.tokenizer, task, examples, max_new_tokens=max_new_tokens,
                        verify=self.scorer.verify)


class Episodes:
    """Multi-turn episodes with an environment (module docstring)."""

    def __init__(self, calls: EnvCalls, max_turns: int, max_tokens: int, engine_positions: int | None = None) -> None:
        self.calls, self.max_turns, self.max_tokens = calls, max_turns, max_tokens
        self.engine_positions = engine_positions  # what the engine serves (vllm.max_model_len), if fewer
        self.runner: EpisodeRunner | None = None

    def bind(self, tokenizer: Any, model: torch.nn.Module) -> None:
        """Episodes fit the fewer of the model's positions and the engine's."""
        known = [p for p in (model_positions(model), self.engine_positions) if p is not None]
        limits = Limits(self.max_turns, self.max_tokens, min(known) if known else None)
        self.runner = EpisodeRunner(self.calls, tokenizer, limits)

    def pids(self) -> list[int]:
        return self.calls.pids

    def prompt_tools(self) -> list[dict] | None:
        """The environment's tools, for a chat template to list in the prompt (the call format is the template's)."""
        return self.calls.tool_schemas()

    def close(self) -> None:
        self.calls.close()

    def overlong_limit(self, params: SamplingParams) -> int:
        """L_max of DAPO's overlong shaping: an episode's token budget."""
        return self.max_tokens

    def sample(self, engine: RolloutEngine, prompts: Prompts, n: int, params: SamplingParams, seeds: list[int],
               timer: StageTimer) -> tuple[RolloutBatch, list[Example], Scores]:
        with timer("rollout"):
            got = self.runner.run(engine, prompts.ids, prompts.examples, n, params, seeds)
        examples = [prompts.examples[i] for i in got.batch.prompt_index.tolist()]
        metrics = dict(got.metrics, **{"reward/accuracy": got.success.float().mean().item()})
        scores = Scores(got.rewards, got.success, metrics, got.rewards[:, None].clone(), (1.0,))
        return got.batch, examples, scores

    def evaluate(self, engine: RolloutEngine, task: Task, examples: list[Example], max_new_tokens: int,
                 batch_size: int = 256) -> dict:
        """Greedy episodes of the held-out problems: success rate (`accuracy`) and turns per episode."""
        greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        wins, turns = 0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = encode_prompts(task, self.runner.tokenizer, chunk, self.prompt_tools())
            got = self.runner.run(engine, prompts.ids, chunk, 1, greedy, list(range(start, start + len(chunk))))
            wins += int(got.success.sum())
            turns += int(got.turns.sum())
        n = len(examples)
        return {"accuracy": wins / max(n, 1), "turns": turns / max(n, 1), "n": n}
