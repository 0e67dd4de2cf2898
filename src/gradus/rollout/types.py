"""Typed records of the rollout stage: the sampling settings and the batch of sampled completions.

A `RolloutBatch` holds one row per completion. Prompts are LEFT-padded so that every prompt ends at
column P-1 and every completion starts at column P (`completion_start`); completions are RIGHT-padded.
Concatenating the two gives the exact input of the trainer's forward pass, with position ids
`(attention_mask.cumsum(-1) - 1).clamp(min=0)` (the convention of HF `generate` with left padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled. Order of filters (as in HF `generate`): temperature, top-k, top-p."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    max_new_tokens: int = 64
    """Hard limit on completion length; a row that reaches it has finish reason "length"."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RolloutBatch:
    """B sampled completions with their prompts; every tensor lives on one device.

    Masks use 1 = real token. `sampling_logp` is the engine's log-prob of each sampled token.
    `LocalEngine`: log softmax(logits / temperature) of the FULL distribution (before top-k / top-p),
    exactly what the trainer's forward computes, so on-policy ratios start at exactly 1 (greedy rows
    use temperature 1). `VLLMEngine`: as vLLM's sampler drew it (after top-k / top-p, when on), the
    true sampling probability; the trainer measures its gap to its own (`mismatch/*` metrics) and can
    correct for it (`algo.rollout_correction`).

    `routed_experts` (mixture-of-experts models, `LocalEngine` only; None otherwise) is the rollout's
    routing, for Rollout Routing Replay (R3, `models/routing.py`): [B, P+T, L, k] int64 aligned with
    `input_ids`, the top-k experts of each token in each of the L MoE layers, in the router's order,
    and -1 (all k entries) where nothing was routed: prompt padding, completion padding, and the last
    generated token of each row, which the rollout never needs to feed (see `rollout/routing_record.py`).

    `action_mask` (multi-turn episodes, `gradus.envs.episodes`; None otherwise) marks, among the completion's
    tokens, those the model sampled (1) apart from those an environment answered with (0): the completion is
    then every turn and every answer in order, and only the model's tokens carry sampling log-probs and enter
    the loss (`loss_tokens`). `turn_rewards` holds the environment's reward for each turn at the turn's last model
    token (0 elsewhere), for the estimators that place rewards per token (PPO's GAE).
    """

    prompt_ids: torch.Tensor  # [B, P] long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [B, P] long, 1 = real prompt token
    completion_ids: torch.Tensor  # [B, T] long, right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B, T] long, 1 = generated token (incl. the EOS that ended the row)
    sampling_logp: torch.Tensor  # [B, T] float32, 0 at padding
    lengths: torch.Tensor  # [B] long, number of generated tokens
    truncated: torch.Tensor  # [B] bool, True = stopped by max_new_tokens
    prompt_index: torch.Tensor  # [B] long, index of the row's prompt in the list given to generate
    pad_token_id: int = 0
    routed_experts: torch.Tensor | None = None  # [B, P+T, L, k] int64, -1 = no routing (class docstring)
    action_mask: torch.Tensor | None = None  # [B, T] long, 1 = a token the model sampled (class docstring)
    turn_rewards: torch.Tensor | None = None  # [B, T] float32, episodes: each turn's reward at its last token

    def __post_init__(self) -> None:
        for name in ("action_mask", "turn_rewards"):
            value = getattr(self, name)
            if value is not None and value.shape != self.completion_ids.shape:
                raise ValueError(f"{name} must be [B, T] = {list(self.completion_ids.shape)}, got {list(value.shape)}")
        routed = self.routed_experts
        if routed is None:
            return
        want = (self.prompt_ids.shape[0], self.prompt_ids.shape[1] + self.completion_ids.shape[1])
        if routed.dim() != 4 or tuple(routed.shape[:2]) != want or routed.dtype != torch.long:
            raise ValueError(f"routed_experts must be int64 [B, P+T, L, k] with [B, P+T] = {list(want)}, "
                             f"got {routed.dtype} {list(routed.shape)}")

    # ---- views --------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def completion_start(self) -> int:
        """Column of the first completion token in `input_ids` (= P)."""
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [B, P+T]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # [B, P+T]

    @property
    def loss_tokens(self) -> torch.Tensor:
        """[B, T] long: 1 = a token the model sampled (every completion token, unless an environment answered)."""
        if self.action_mask is None:
            return self.completion_mask
        return self.completion_mask * self.action_mask  # [B, T]

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum().item())

    @property
    def finish_reasons(self) -> list[str]:
        return ["length" if t else "eos" for t in self.truncated.tolist()]

    @property
    def device(self) -> torch.device:
        return self.prompt_ids.device

    def routing_parts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`routed_experts` split at `completion_start`: (prompt [B, P, L, k], completion [B, T, L, k])
        views; None when the batch has no routing."""
        if self.routed_experts is None:
            return None
        P = self.completion_start
        return self.routed_experts[:, :P], self.routed_experts[:, P:]

    # ---- transforms ---------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set (an absent optional field is left out, so it stays None)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "pad_token_id" and getattr(self, f.name) is not None}

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(**{k: v.to(device) for k, v in self._tensors().items()},
                            pad_token_id=self.pad_token_id)

    def clone(self) -> RolloutBatch:
        return RolloutBatch(**{k: v.clone() for k, v in self._tensors().items()},
                            pad_token_id=self.pad_token_id)

    def select(self, rows: torch.Tensor | Sequence[int]) -> RolloutBatch:
        """A new batch made of `rows` (indices or a bool mask), in that order."""
        rows = torch.as_tensor(rows, device=self.device)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)  # [R]
        return RolloutBatch(**{k: v.index_select(0, rows) for k, v in self._tensors().items()},
                            pad_token_id=self.pad_token_id)

    def trim(self) -> RolloutBatch:
        """Drop the prompt columns that are padding in every row (left), and likewise completion columns."""
        p_real = self.prompt_mask.any(dim=0).nonzero()  # [*, 1]
        p0 = int(p_real[0, 0]) if p_real.numel() else self.prompt_mask.shape[1]
        t_real = self.completion_mask.any(dim=0).nonzero()  # [*, 1]
        t1 = int(t_real[-1, 0]) + 1 if t_real.numel() else 0
        out = self._tensors()
        for k in ("prompt_ids", "prompt_mask"):
            out[k] = out[k][:, p0:]
        for k in ("completion_ids", "completion_mask", "sampling_logp", "action_mask", "turn_rewards"):
            if k in out:
                out[k] = out[k][:, :t1]
        if (parts := self.routing_parts()) is not None:
            out["routed_experts"] = torch.cat([parts[0][:, p0:], parts[1][:, :t1]], dim=1)  # [B, P'+T', L, k]
        return RolloutBatch(**out, pad_token_id=self.pad_token_id)

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Stack rows of several batches, re-padding prompts (left) and completions (right) to common widths.

        `prompt_index` is kept as given (not renumbered); the pad id of the first batch is used.
        `routed_experts` is re-padded with -1 alike; either every batch has it or none does.
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        with_routing = sum(b.routed_experts is not None for b in batches)
        if 0 < with_routing < len(batches):
            raise ValueError(f"{with_routing} of {len(batches)} batches have routed_experts: a batch "
                             "with routing cannot be joined to one without")
        pad = batches[0].pad_token_id
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.completion_ids.shape[1] for b in batches)

        # pad dim 1 (columns) of a [B, S, ...] tensor; F.pad counts its pairs from the last dim
        def left(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (width - x.shape[1], 0), value=value)

        def right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=value)

        actions = None
        if any(b.action_mask is not None for b in batches):  # a batch without one: every token is the model's
            actions = torch.cat([right(b.loss_tokens if b.action_mask is None else b.action_mask, T, 0)
                                 for b in batches])  # [sum B, T]
        turns = None
        if any(b.turn_rewards is not None for b in batches):  # a batch without: no reward placed in a turn
            turns = torch.cat([right(b.turn_rewards if b.turn_rewards is not None
                                     else torch.zeros_like(b.sampling_logp), T, 0.0) for b in batches])  # [sum B, T]
        routed = None
        if with_routing:
            routed = torch.cat([torch.cat([left(p, P, -1), right(c, T, -1)], dim=1)
                                for p, c in (b.routing_parts() for b in batches)])  # [sum B, P+T, L, k]

        return cls(
            prompt_ids=torch.cat([left(b.prompt_ids, P, pad) for b in batches]),  # [sum B, P]
            prompt_mask=torch.cat([left(b.prompt_mask, P, 0) for b in batches]),  # [sum B, P]
            completion_ids=torch.cat([right(b.completion_ids, T, pad) for b in batches]),  # [sum B, T]
            completion_mask=torch.cat([right(b.completion_mask, T, 0) for b in batches]),  # [sum B, T]
            sampling_logp=torch.cat([right(b.sampling_logp, T, 0.0) for b in batches]),  # [sum B, T]
            lengths=torch.cat([b.lengths for b in batches]),  # [sum B]
            truncated=torch.cat([b.truncated for b in batches]),  # [sum B]
            prompt_index=torch.cat([b.prompt_index for b in batches]),  # [sum B]
            pad_token_id=pad,
            routed_experts=routed,
            action_mask=actions,
            turn_rewards=turns,
        )
