"""The routing of a `LocalEngine` rollout on a mixture-of-experts model, as the rollout computed it.

Rollout Routing Replay (R3, `models/routing.py`) forces the training forward to use the experts the
rollout chose. `LocalEngine` records them with `routing.capture` hooks while it samples, into
`RolloutBatch.routed_experts`: [B, P+T, L, k] int64, aligned with `input_ids`.

Which column holds what, for a row with prompt columns p0..P-1 and completion length len:
- prompt columns p0..P-1: from the one prefill forward of the row's prompt, repeated for its n
  completions as the KV cache is (all n share that prefill, so they share its routing);
- completion column P+t, t < len-1: from the decoding step that FED token t, the step after the one
  that sampled it (a token is routed when it is the model's input, not when it is the output);
- -1 (all k entries): prompt padding (columns < p0), completion padding (columns >= P+len), and the
  row's last token (column P+len-1: its EOS, or the token that reached max_new_tokens).

Why the last token may be -1: the rollout samples it and stops, so its routing was never computed.
(A finished row that has not been dropped yet does feed its EOS; that routing is discarded too, so
the field never depends on when the engine happened to drop the row.) It does not matter for any
log-prob: in a causal model, the hidden states at column j, in every layer, depend on the tokens and
the routing at columns <= j only. The log-prob of the token at column c is read from the logits at
column c-1, so it depends on the routing at columns < c. The last token sits at the row's last real
column, so no log-prob of a real token of the row (nor the entropy of any distribution that predicts
one) depends on its routing. Under replay its -1 rows are not forced: the router chooses there, which
only changes the logits at that column (the distribution of a token after the row's end, never
trained) and the padding after it. Only a quantity read AT the last token's column would see the
router's own choice, e.g. a critic's value of the final state, were the critic an MoE model replayed
with these experts.

Cost: one [B, P+T, L, k] int64 tensor on the model's device, plus a copy per decoding step of the
live rows' [R, L, k] (no host sync).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from gradus.models.routing import MoeLayout, RoutingCapture, capture
from gradus.rollout.types import RolloutBatch


class RolloutRouting:
    """Fills the rollout's [B, P+T, L, k] routing, one decoder call at a time (see the module docstring).

    Call `prefill` after the decoder's prefill, `step` after each decoder step, `finish` at the end."""

    def __init__(self, record: RoutingCapture, max_new_tokens: int) -> None:
        self._record = record
        self._max_new_tokens = max_new_tokens
        self._prompt_len = 0
        self._experts: torch.Tensor | None = None  # [B, P+T, L, k], -1 until written

    def _one_forward(self) -> torch.Tensor:
        forwards = self._record.take()
        if len(forwards) != 1:
            raise RuntimeError(f"a decoder call ran {len(forwards)} model forwards; one was expected")
        return forwards[0]  # [rows, S, L, k]

    def prefill(self, repeats: int) -> None:
        """The prefill forward of the N unique prompts; each is repeated `repeats` times, as the KV cache."""
        prompt = self._one_forward()  # [N, P, L, k]
        N, P, L, k = prompt.shape
        self._prompt_len = P
        self._experts = prompt.new_full((N * repeats, P + self._max_new_tokens, L, k), -1)  # [B, P+T, L, k]
        self._experts[:, :P] = prompt.repeat_interleave(repeats, dim=0)  # [B, P, L, k]

    def step(self, rows: torch.Tensor, column: int) -> None:
        """A decoding step that fed the tokens sampled at completion `column`; rows: [R] the original row of
        each live batch row (the engine drops finished rows, so batch row i is not row i any more)."""
        fed = self._one_forward()  # [R, 1, L, k]
        self._experts[:, self._prompt_len + column].index_copy_(0, rows, fed[:, 0])

    def finish(self, prompt_mask: torch.Tensor, lengths: torch.Tensor, steps: int) -> torch.Tensor:
        """The routing, [B, P+steps, L, k]: -1 at padding and at each row's last token.

        prompt_mask: [B, P] 1 = real prompt token; lengths: [B] completion lengths; steps: completion
        columns sampled (the widest row)."""
        fed = torch.arange(steps, device=lengths.device) < (lengths - 1)[:, None]  # [B, t] fed back to the model
        known = torch.cat([prompt_mask.bool(), fed], dim=1)  # [B, P+t]
        return self._experts[:, : self._prompt_len + steps].masked_fill(~known[:, :, None, None], -1)


# ---- multi-turn episodes (gradus.envs.episodes): one routing per episode, spliced from its turns' batches ----
def splice_turn(known: torch.Tensor | None, batch: RolloutBatch, row: int, read: int, take: int) -> torch.Tensor | None:
    """An episode's routing after one more turn: `known` ([read, L, k], -1 where no call has read the position
    yet; None before turn 1) with row `row` of the turn's batch (whose prompt was the episode's `read` tokens so
    far) and the `take` tokens of it the episode keeps. None when the engine records no routing.

    Each position keeps the routing of the first engine call that read it as input: the prompt's from turn 1's
    prefill; a model token's from the decoding step that fed it; the environment's tokens and each turn's last
    token (never fed in its turn) from the next turn's prefill. A later turn reads the whole history again, and
    its routing of positions already known is not kept: no single routing is every turn's (docs/environments.md,
    Limits)."""
    if batch.routed_experts is None:
        return None
    P = batch.prompt_ids.shape[1]
    prefill = batch.routed_experts[row, P - read : P]  # [read, L, k]
    if known is None:
        known = prefill.clone()
    else:
        unknown = known[:, 0, 0] < 0  # [read]
        known[unknown] = prefill[unknown]
    return torch.cat([known, batch.routed_experts[row, P : P + take]])  # [read + take, L, k]


def not_read(known: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """`known` with `n` positions no call has read yet (the environment's tokens) appended as -1."""
    return None if known is None else torch.cat([known, known.new_full((n, *known.shape[1:]), -1)])


def with_episode_routing(batch: RolloutBatch, routings: list[torch.Tensor | None]) -> RolloutBatch:
    """`batch` of episodes (one row each, prompts left-padded) with their spliced routings as its
    [B, P+T, L, k] routing, -1 at padding; the batch itself when there are none."""
    if routings[0] is None:
        return batch
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    routed = routings[0].new_full((len(routings), P + T, *routings[0].shape[1:]), -1)  # [B, P+T, L, k]
    starts, ends = P - batch.prompt_mask.sum(-1), P + batch.lengths
    for i, (known, start, end) in enumerate(zip(routings, starts.tolist(), ends.tolist(), strict=True)):
        routed[i, start:end] = known
    return replace(batch, routed_experts=routed)


@contextmanager
def record_routing(model: nn.Module, layout: MoeLayout | None, max_new_tokens: int) -> Iterator[RolloutRouting | None]:
    """While active, the routers of `model` are hooked (read only) for a `RolloutRouting`; with no layout
    (a dense model), yields None and touches nothing."""
    if layout is None:
        yield None
        return
    with capture(model) as record:
        yield RolloutRouting(record, max_new_tokens)
