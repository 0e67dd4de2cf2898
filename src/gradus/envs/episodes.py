"""Episodes: many multi-turn episodes in flight over one engine, batched per turn, token in and token out.

An episode's completion is the concatenation, in order, of the tokens the model sampled in each turn and the
tokens of the environment's answers (`render.TurnRenderer`); nothing the model produced is decoded and
encoded again. `RolloutBatch.action_mask` marks the model's tokens: only they carry sampling log-probs and
enter the loss, so every objective, rollout correction and estimator works on them unchanged (GAE runs over
the model's tokens only, skipping the environment's).

Turn by turn, for the episodes still live:
1. the engine samples one turn: in turn 0, the group's n completions of each prompt, keyed exactly as a
   one-turn rollout is (so a one-turn environment reproduces it token for token); later, each episode alone,
   keyed by (its prompt's key, its index in the group, the turn), so an episode's tokens never depend on the
   rest of the batch (batch-invariant, as the engines are per completion);
2. each turn is cut to the episode's token budget (`max_tokens`, model and environment tokens together);
3. a turn with a tool call runs the tool, one without is the environment's `step` (both in the workers of
   `calls.EnvCalls`); the answer is rendered and appended unless the episode is over.
An episode ends when the environment says done, after `max_turns` turns, when its budget has no room for
another model token (flagged `truncated`), or when its environment fails (an error, a bad answer, a time-out:
flagged, and its tokens leave the loss, because its reward says nothing about what the model did).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from gradus.envs.base import Step
from gradus.envs.calls import EnvCalls
from gradus.envs.render import TurnRenderer
from gradus.envs.tools import Malformed, ToolCall, format_result, parse_tool_call, style_for
from gradus.rewards.pool import Failure
from gradus.rollout import RolloutBatch, RolloutEngine, SamplingParams
from gradus.rollout.routing_record import not_read, splice_turn, with_episode_routing
from gradus.tasks import Example

log = logging.getLogger("gradus.envs")

# metrics of a step that count (summed over data-parallel ranks, each playing its share); the others are means
EPISODE_COUNTS = ("env/model_tokens", "env/env_tokens", "env/tool_calls", "env/tool_errors", "env/tool_timeouts",
                  "env/tool_malformed")


@dataclass(frozen=True)
class Limits:
    max_turns: int  # model turns per episode
    max_tokens: int  # completion tokens per episode, the model's and the environment's together
    positions: int | None = None  # the model's (an episode's budget is also what its prompt leaves of them)

    def budget(self, prompt: Sequence[int]) -> int:
        room = self.max_tokens if self.positions is None else min(self.max_tokens, self.positions - len(prompt))
        if room < 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in the model's {self.positions} "
                             "positions")
        return room


@dataclass
class _Episode:
    """One episode while it runs."""

    prompt: list[int]
    key: int  # its prompt's sampling key
    sample: int  # its index in the group
    example: Example
    budget: int  # completion tokens it may hold (`Limits.budget`)
    state: Any = None
    ids: list[int] = field(default_factory=list)
    action: list[int] = field(default_factory=list)  # 1 = the model's token
    logp: list[float] = field(default_factory=list)
    reward: float = 0.0
    paid: list[tuple[int, float]] = field(default_factory=list)  # (its last token's column, reward) per turn
    success: bool | None = None
    turns: int = 0
    last: list[int] = field(default_factory=list)  # the model's tokens of its latest turn
    cut: bool = False  # its latest turn stopped at the turn's token limit, without a stop token
    done: bool = False
    truncated: bool = False  # its budget ran out
    failure: str | None = None  # why its environment failed
    routing: torch.Tensor | None = None  # [prompt + ids, L, k] a mixture-of-experts engine's routing, -1 = not fed yet

    def over(self) -> bool:
        return self.done or self.truncated or self.failure is not None


@dataclass
class Episodes:
    """The episodes of a batch: the rollout batch (with `action_mask`) and what the environment said."""

    batch: RolloutBatch
    rewards: torch.Tensor  # [N] float32, the sum of each episode's turn rewards
    success: torch.Tensor  # [N] bool
    turns: torch.Tensor  # [N] long, model turns taken
    failed: torch.Tensor  # [N] bool, the environment failed (the row's tokens are out of the loss)
    metrics: dict[str, float]


def turn_key(key: int, sample: int, turn: int) -> int:
    """The sampling key of turn `turn` (>= 1) of sample `sample` of a prompt keyed `key` (63 bits)."""
    digest = hashlib.blake2b(f"{key}:{sample}:{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class EpisodeRunner:
    """Runs episodes of one environment with an engine (module docstring)."""

    def __init__(self, env: EnvCalls, tokenizer: Any, limits: Limits) -> None:
        self.env, self.tokenizer, self.limits = env, tokenizer, limits
        self.renderer = TurnRenderer(tokenizer, roles=("user", "tool") if env.tools else ("user",))
        self.style = style_for(tokenizer)
        self._told: set[str] = set()  # the failures logged already

    def run(self, engine: RolloutEngine, prompts: Sequence[Sequence[int]], examples: Sequence[Example], n: int,
            params: SamplingParams, seeds: Sequence[int]) -> Episodes:
        """n episodes of each prompt (rows j*n .. j*n+n-1 belong to prompts[j]), sampled with `params` per turn."""
        stats = {"tool_calls": 0, "tool_errors": 0, "tool_timeouts": 0, "tool_malformed": 0, "env_s": 0.0}
        lim = self.limits
        episodes = [_Episode(list(p), int(k), s, ex, lim.budget(p))
                    for p, k, ex in zip(prompts, seeds, examples, strict=True) for s in range(n)]
        states = self._timed(stats, self.env.reset, examples)
        for i, e in enumerate(episodes):
            got = states[i // n]
            if isinstance(got, Failure):
                e.failure = f"reset failed ({got.kind}): {got.detail}"
            else:
                e.state = got
        # turn 0: whole groups, keyed exactly as a one-turn rollout (an episode whose reset failed samples too)
        first = params
        if (least := min(e.budget for e in episodes)) < params.max_new_tokens:
            first = replace(params, max_new_tokens=least)
        self._append(episodes, engine.generate([e.prompt for e in episodes[::n]], n, first,
                                               seeds=[e.key for e in episodes[::n]]))
        for turn in range(self.limits.max_turns):
            live = [e for e in episodes if not e.over()]
            if not live:
                break
            if turn > 0:
                self._sample(engine, live, turn, params)
            self._answer(live, turn, stats)
        return self._finish(episodes, n, stats)

    # ---- one turn ---------------------------------------------------------------------------------------
    def _sample(self, engine: RolloutEngine, live: list[_Episode], turn: int, params: SamplingParams) -> None:
        """Turn `turn` (>= 1) of each live episode, appended: each episode alone, one engine call per turn cap
        (an episode's cap is its budget left, when that is below the turn's limit)."""
        caps: dict[int, list[_Episode]] = {}
        for e in live:
            caps.setdefault(min(params.max_new_tokens, e.budget - len(e.ids)), []).append(e)
        for cap, group in caps.items():
            batch = engine.generate([e.prompt + e.ids for e in group], 1, replace(params, max_new_tokens=cap),
                                    seeds=[turn_key(e.key, e.sample, turn) for e in group])
            self._append(group, batch)

    def _append(self, group: list[_Episode], batch: RolloutBatch) -> None:
        ids, logp = batch.completion_ids.tolist(), batch.sampling_logp.tolist()
        for r, (e, row, lp, length) in enumerate(zip(group, ids, logp, batch.lengths.tolist(), strict=True)):
            take = min(length, e.budget - len(e.ids))
            e.routing = splice_turn(e.routing, batch, r, len(e.prompt) + len(e.ids), take)
            e.ids += row[:take]
            e.action += [1] * take
            e.logp += lp[:take]
            e.turns += 1
            # a turn not closed by its end-of-turn token (cut by a limit, or stopped by another of the model's
            # stop tokens) gets it from the environment's side, so every turn ends as the template writes it
            e.last, e.cut = row[:take], take == 0 or row[take - 1] not in self.renderer.end_of_turn_ids
            e.truncated = take < length

    def _answer(self, live: list[_Episode], turn: int, stats: dict[str, float]) -> None:
        """The environment's (or a tool's) answer to each live episode's turn, appended when the episode goes on."""
        items, owners, notes = [], [], {}
        texts = self.tokenizer.batch_decode([e.last for e in live], skip_special_tokens=True)
        for e, text in zip(live, texts, strict=True):
            call = parse_tool_call(text, self.style) if self.env.tools else None
            if isinstance(call, ToolCall):
                stats["tool_calls"] += 1
                items.append(("tool", (call.name, call.argument)))
                owners.append((e, call))
            elif isinstance(call, Malformed):
                stats["tool_calls"] += 1
                stats["tool_malformed"] += 1
                notes[id(e)] = f"malformed tool call: {call.reason}"
            else:
                items.append(("step", (e.state, text)))
                owners.append((e, None))
        answers = self._call(stats, items)
        last_turn = turn == self.limits.max_turns - 1
        for e in live:
            if id(e) in notes:
                self._observe(e, format_result(notes[id(e)], self.style), "tool", last_turn)
        for (e, call), got in zip(owners, answers, strict=True):
            if call is not None:  # a tool: whatever happened is the observation
                if isinstance(got, Failure):
                    stats["tool_timeouts" if got.kind == "timeout" else "tool_errors"] += 1
                    got = (f"tool {call.name} timed out after {self.env.timeout_s:g} s" if got.kind == "timeout"
                           else f"tool {call.name} failed: {_last_line(got.detail)}")
                self._observe(e, format_result(got, self.style), "tool", last_turn)
            elif isinstance(got, Failure):
                e.failure = f"step failed ({got.kind}): {got.detail}"
            else:
                step: Step = got
                e.reward += float(step.reward)
                e.paid.append((len(e.ids) - 1, float(step.reward)))  # the turn answered ends the sequence so far
                e.state = step.state
                if step.success is not None:
                    e.success = step.success
                e.done = step.done
                if not e.done:
                    self._observe(e, step.observation, "user", last_turn)

    def _observe(self, e: _Episode, observation: Any, role: str, last_turn: bool) -> None:
        """Append an answer to a live episode, unless no model turn follows; an answer the budget cannot hold
        with room for one more model token ends the episode, truncated."""
        if last_turn or e.truncated:
            return
        try:
            ids = self.renderer.observation_ids(observation, role=role, ended=not e.cut)
        except ValueError as err:  # a chat template that would rewrite earlier turns for this text
            e.failure = f"its answer cannot be rendered: {err}"
            return
        if len(e.ids) + len(ids) >= e.budget:
            e.truncated = True
            return
        e.ids += ids
        e.action += [0] * len(ids)
        e.logp += [0.0] * len(ids)
        e.routing = not_read(e.routing, len(ids))  # routed when the next turn reads them

    def _tell(self, episodes: list[_Episode]) -> None:
        """Log each kind of failure once per run (the metrics count every one): how many episodes of this batch it
        ended, and the first of them by episode, example and sample."""
        failed: dict[str, list[int]] = {}
        for i, e in enumerate(episodes):
            if e.failure is not None:
                failed.setdefault(_last_line(e.failure), []).append(i)
        for reason, rows in failed.items():
            if reason in self._told:
                continue
            self._told.add(reason)
            first = episodes[rows[0]]
            log.warning("environment %r: %d episode(s) of this batch ended by a failure of the environment (this "
                        "kind is logged once; env/failed counts them); the first, episode %d (example %s, sample "
                        "%d): %s", self.env.name, len(rows), rows[0], first.example.source or
                        repr(first.example.prompt), first.sample, first.failure)

    def _call(self, stats: dict[str, float], items: list[tuple[str, Any]]) -> list[Any]:
        return self._timed(stats, self.env.call, items)

    @staticmethod
    def _timed(stats: dict[str, float], call: Any, arg: Any) -> list[Any]:
        """`call(arg)`, its time added to the step's environment seconds (`env/env_s`)."""
        start = time.perf_counter()
        try:
            return call(arg)
        finally:
            stats["env_s"] += time.perf_counter() - start

    # ---- the batch -------------------------------------------------------------------------------------
    def _finish(self, episodes: list[_Episode], n: int, stats: dict[str, float]) -> Episodes:
        self._tell(episodes)
        pad = self.tokenizer.pad_token_id
        B, P = len(episodes), max(len(e.prompt) for e in episodes)
        T = max(1, max(len(e.ids) for e in episodes))
        # padded rows built as lists, then one array per field: ~0.1 ms each for 128 x 16, where torch.tensor of
        # nested lists takes ~0.5 ms and row-by-row tensor writes ~4 ms in all (measured on 2 cores)
        live = [e.failure is None for e in episodes]
        prompt_ids = _tensor([[pad] * (P - len(e.prompt)) + e.prompt for e in episodes])  # [B, P]
        prompt_mask = _tensor([[0] * (P - len(e.prompt)) + [1] * len(e.prompt) for e in episodes])  # [B, P]
        completion_ids = _tensor([e.ids + [pad] * (T - len(e.ids)) for e in episodes])  # [B, T]
        completion_mask = _tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in episodes])  # [B, T]
        # a failed episode's tokens leave the loss
        action_mask = _tensor([(e.action if ok else [0] * len(e.ids)) + [0] * (T - len(e.ids))
                               for e, ok in zip(episodes, live, strict=True)])  # [B, T]
        sampling_logp = _tensor([e.logp + [0.0] * (T - len(e.logp)) for e in episodes], np.float32)  # [B, T]
        paid = [[0.0] * T for _ in episodes]
        for row, e, ok in zip(paid, episodes, live, strict=True):
            for column, reward in e.paid if ok else ():
                row[column] += reward
        turn_rewards = _tensor(paid, np.float32)  # [B, T]
        batch = RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, sampling_logp=sampling_logp,
            lengths=completion_mask.sum(-1), truncated=torch.tensor([e.truncated or e.cut for e in episodes]),
            prompt_index=torch.arange(B) // n, pad_token_id=pad, action_mask=action_mask, turn_rewards=turn_rewards)
        batch = with_episode_routing(batch, [e.routing for e in episodes])  # MoE: each turn's, spliced
        rewards = torch.tensor([e.reward if e.failure is None else 0.0 for e in episodes], dtype=torch.float32)
        success = torch.tensor([e.failure is None and (e.success if e.success is not None else e.reward >= 1.0)
                                for e in episodes])
        turns = torch.tensor([e.turns for e in episodes], dtype=torch.long)
        failed = torch.tensor([e.failure is not None for e in episodes])
        metrics = {
            "env/turns_mean": turns.float().mean().item(),
            "env/success": success.float().mean().item(),
            "env/failed": failed.float().mean().item(),
            "env/truncated": batch.truncated.float().mean().item(),
            "env/model_tokens": float(sum(sum(e.action) for e in episodes)),
            "env/env_tokens": float(sum(len(e.ids) - sum(e.action) for e in episodes)),
            **{f"env/{k}": float(v) for k, v in stats.items()},
        }
        return Episodes(batch, rewards, success, turns, failed, metrics)


def _tensor(rows: list[list[Any]], dtype: type = np.int64) -> torch.Tensor:
    """Equal-length rows as a [len(rows), len(row)] tensor (int64, or float32 rounded from Python's floats)."""
    return torch.from_numpy(np.array(rows, dtype=dtype))


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
