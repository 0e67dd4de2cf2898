"""No-grad forward passes over a whole rollout batch, in token-budgeted micro-batches:
old log-probs, reference log-probs, critic values (step 5 of a training step)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gradus.logprobs import completion_logprobs
from gradus.models import completion_values
from gradus.parallel import equal_pieces
from gradus.rollout import RolloutBatch
from gradus.train import moe
from gradus.train.update import micro_batches


def _pieces(batch: RolloutBatch, token_budget: int) -> Iterator[tuple[torch.Tensor, RolloutBatch, bool]]:
    """(rows, their trimmed sub-batch, real) per micro-batch; as many on every rank (parallel.equal_pieces)."""
    pieces = micro_batches(torch.arange(batch.batch_size), batch, token_budget)
    for micro, real in equal_pieces(pieces, batch.device):
        idx = micro.to(batch.device)
        yield idx, batch.select(idx).trim(), real


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module, batch: RolloutBatch, *, token_budget: int, temperature: float, chunk_size: int,
    routing_replay: str = "none", routes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of every completion token under `model`. -> [N, T] float32 (0 past each row's end)

    MoE policies (`gradus.train.moe`): with routing_replay="r3" every forward is forced to the rollout's
    experts; `routes` ([N, P+T, L, k], r2) receives the routing this pass used (the old policy's)."""
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=batch.device)  # [N, T]
    for idx, sub, real in _pieces(batch, token_budget):
        forced = sub.routed_experts if routing_replay == "r3" else None
        with moe.training_forward(model, forced) as record:
            logp = completion_logprobs(model, sub.input_ids, sub.attention_mask, sub.completion_start,
                                       temperature=temperature, chunk_size=chunk_size)  # [m, T']
        if real:
            out[idx, : logp.shape[1]] = logp * sub.completion_mask
            if routes is not None and record is not None:
                routes[idx, moe.columns(batch, sub)] = record.experts()
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
