"""No-grad forward passes over a whole rollout batch, in token-budgeted micro-batches:
old log-probs, reference log-probs, critic values (steps 5 of a training step)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gradus.logprobs import completion_logprobs
from gradus.models import completion_values
from gradus.parallel import equal_pieces
from gradus.rollout import RolloutBatch
from gradus.train.moe import MoeRouting


@dataclass(frozen=True)
class Passes:
    """How forward passes over a batch run (the config's optim.token_budget, rollout.temperature, model.chunk_size)."""

    token_budget: int  # most rows x padded length in one forward
    temperature: float  # the log-probs are of the tempered distribution the rollout sampled from
    chunk_size: int  # tokens per chunk of the memory-bounded log-prob computation


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
def batch_logprobs(model: torch.nn.Module, batch: RolloutBatch, passes: Passes, *, moe: MoeRouting | None = None,
                   record: bool = False) -> torch.Tensor:
    """Log-probs of every completion token under `model`. -> [N, T] float32 (0 past each row's end)

    MoE policies: `moe` forces the experts its replay mode asks for, and with `record` (the old policy's pass,
    under r2) keeps this pass's routing as the old policy's (`gradus.train.moe`)."""
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.device)  # [N, T]
    for idx, sub, real in _pieces(batch, passes.token_budget):
        routed = moe.forward(model, batch, sub, idx, record=record, real=real) if moe else contextlib.nullcontext()
        with routed:
            logp = completion_logprobs(model, sub.input_ids, sub.attention_mask, sub.completion_start,
                                       temperature=passes.temperature, chunk_size=passes.chunk_size)  # [m, T']
        if real:
            out[idx, : logp.shape[1]] = logp * sub.completion_mask
    if moe is not None and record:
        moe.recorded()
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
