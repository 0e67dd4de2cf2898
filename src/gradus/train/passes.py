"""No-grad forward passes over a whole rollout batch, in token-budgeted micro-batches:
old log-probs, reference log-probs, critic values (steps 5 of a training step); and `ForwardHook`, what
runs around each forward of the policy here and in the update (an MoE policy's routing replay is one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from gradus.logprobs import completion_logprobs
from gradus.models import completion_values
from gradus.parallel import equal_pieces
from gradus.rollout import RolloutBatch


@dataclass(frozen=True)
class Passes:
    """How forward passes over a batch run (the config's optim.token_budget, rollout.temperature, model.chunk_size)."""

    token_budget: int  # most rows x padded length in one forward
    temperature: float  # the log-probs are of the tempered distribution the rollout sampled from
    chunk_size: int  # tokens per chunk of the memory-bounded log-prob computation


class ForwardHook(Protocol):
    """Runs around each forward of the policy over rows of a rollout batch: the old log-prob pass and every
    forward of the update. The passes and the update know no more of it than this; `gradus.train.moe.MoeRouting`
    (routing replay of an MoE policy, and its router loss) is one. A policy with nothing to run has None."""

    aux_coef: float  # weight, in the actor's loss, of the auxiliary loss the model returns (0: none is asked)
    stats: dict[str, float]  # metrics of the last forward it ran around

    def forward(self, model: torch.nn.Module, full: RolloutBatch, sub: RolloutBatch, idx: torch.Tensor, *,
                record: bool, real: bool = True) -> AbstractContextManager[None]:
        """Around one forward of rows `idx` of `full` (trimmed to `sub`); `record`: the forward runs the old
        policy (what it sees may be kept for the later forwards of the batch). Left before backward."""
        ...

    def recorded(self) -> None:
        """The old policy's forwards of the batch are all done."""
        ...

    def records_first_epoch(self, epochs: int) -> bool:
        """Whether, with no old log-prob pass, the update's first epoch must be recorded as the old policy's."""
        ...


def around(hook: ForwardHook | None, model: torch.nn.Module, full: RolloutBatch, sub: RolloutBatch,
           idx: torch.Tensor, *, record: bool, real: bool) -> AbstractContextManager[None]:
    """`hook.forward(...)`, or nothing to run when there is no hook."""
    if hook is None:
        return contextlib.nullcontext()
    return hook.forward(model, full, sub, idx, record=record, real=real)


def micro_batches(rows: torch.Tensor, batch: RolloutBatch, token_budget: int) -> list[torch.Tensor]:
    """Split `rows` into consecutive pieces whose rows x (prompt + longest completion) <= budget."""
    prompt_len = batch.prompt_mask[rows].sum(-1)  # [R]
    total = (prompt_len + batch.lengths[rows]).tolist()
    pieces, current, width = [], [], 0
    for r, n in zip(rows.tolist(), total, strict=True):
        new_width = max(width, n)
        if current and new_width * (len(current) + 1) > token_budget:
            pieces.append(current)
            current, new_width = [], n
        current.append(r)
        width = new_width
    if current:
        pieces.append(current)
    return [torch.tensor(p, dtype=torch.long) for p in pieces]


def _pieces(batch: RolloutBatch, token_budget: int) -> Iterator[tuple[torch.Tensor, RolloutBatch, bool]]:
    """(rows, their trimmed sub-batch, real) per micro-batch; as many on every rank (parallel.equal_pieces)."""
    pieces = micro_batches(torch.arange(batch.batch_size), batch, token_budget)
    for micro, real in equal_pieces(pieces, batch.device):
        idx = micro.to(batch.device)
        yield idx, batch.select(idx).trim(), real


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, batch: RolloutBatch, passes: Passes, *, hook: ForwardHook | None = None,
                   record: bool = False) -> torch.Tensor:
    """Log-probs of every completion token under `model`. -> [N, T] float32 (0 past each row's end)

    `hook` runs around each forward; `record`: this pass is the old policy's (the hook may keep what it saw)."""
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.device)  # [N, T]
    for idx, sub, real in _pieces(batch, passes.token_budget):
        with around(hook, model, batch, sub, idx, record=record, real=real):
            logp = completion_logprobs(model, sub.input_ids, sub.attention_mask, sub.completion_start,
                                       temperature=passes.temperature, chunk_size=passes.chunk_size)  # [m, T']
        if real:
            out[idx, : logp.shape[1]] = logp * sub.completion_mask
    if hook is not None and record:
        hook.recorded()
    return out


@torch.no_grad()
def batch_values(critic: torch.nn.Module, batch: RolloutBatch, *, token_budget: int) -> torch.Tensor:
    """V(state before completion token t) for every row. -> [N, T] float32 (0 past each row's end)"""
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.device)  # [N, T]
    for idx, sub, real in _pieces(batch, token_budget):
        values = completion_values(critic, sub.input_ids, sub.attention_mask, sub.completion_start)  # [m, T']
        if real:
            out[idx, : values.shape[1]] = values * sub.completion_mask
    return out
