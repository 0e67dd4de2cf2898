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
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum().item())

    @property
    def finish_reasons(self) -> list[str]:
        return ["length" if t else "eos" for t in self.truncated.tolist()]

    @property
    def device(self) -> torch.device:
        return self.prompt_ids.device

    # ---- transforms ---------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pad_token_id"}

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
        for k in ("completion_ids", "completion_mask", "sampling_logp"):
            out[k] = out[k][:, :t1]
        return RolloutBatch(**out, pad_token_id=self.pad_token_id)

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Stack rows of several batches, re-padding prompts (left) and completions (right) to common widths.

        `prompt_index` is kept as given (not renumbered); the pad id of the first batch is used.
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        pad = batches[0].pad_token_id
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.completion_ids.shape[1] for b in batches)

        def left(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

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
        )
