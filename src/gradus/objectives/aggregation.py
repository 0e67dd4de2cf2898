"""Loss aggregation: how a [B, T] matrix of per-token losses becomes one scalar.

Most of what separates GRPO, DAPO and Dr. GRPO is this choice (see docs/objectives.md):

- ``token-mean``              sum_{i,t} l_it / N_tokens            (DAPO's token-level loss)
- ``seq-mean-token-mean``     1/N_seq sum_i (1/|o_i| sum_t l_it)   (GRPO, GSPO, SAPO)
- ``seq-mean-token-sum``      1/N_seq sum_i sum_t l_it
- ``seq-mean-token-sum-norm`` 1/N_seq sum_i (sum_t l_it) / norm    (Dr. GRPO: a constant norm, default T)

Rows with no counted token are left out of N_seq and contribute nothing.

Distributed use: data-parallel ranks (or gradient-accumulation micro-batches) each see part of the
global batch. Pass the *global* denominators as ``num_tokens`` / ``num_seqs``; then each part's
loss is its share of the global-batch loss, and summing the parts' gradients gives exactly the
gradient of the global loss. (With DDP, which averages gradients over ranks, multiply the local
loss by the world size.)
"""

from __future__ import annotations

import torch

from gradus.objectives._tensor import at_least_fp32, check_shapes, row_lengths

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_agg_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str,
    *,
    norm: float | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate per-token losses [B, T] into a scalar.

    Args:
        loss_mat: per-token losses. [B, T]
        loss_mask: 1 where a token counts, 0 elsewhere. [B, T]
        mode: one of AGG_MODES.
        norm: the constant of ``seq-mean-token-sum-norm`` (default: T, the padded length).
            Rejected for other modes, which have no use for it.
        num_tokens: global number of counted tokens (``token-mean`` only); default: this batch's.
        num_seqs: global number of non-empty sequences (``seq-mean-*``); default: this batch's.
    """
    check_agg_mode(mode)
    check_shapes("loss_mat", loss_mat, loss_mask=loss_mask)
    if norm is not None and mode != "seq-mean-token-sum-norm":
        raise ValueError(f"norm is only used by 'seq-mean-token-sum-norm', not by {mode!r}")
    if num_tokens is not None and mode != "token-mean":
        raise ValueError(f"num_tokens is only used by 'token-mean', not by {mode!r} (pass num_seqs)")
    if num_seqs is not None and mode == "token-mean":
        raise ValueError("num_seqs is not used by 'token-mean' (pass num_tokens)")

    loss_mat = at_least_fp32(loss_mat)
    mask = loss_mask.to(loss_mat.dtype)
    # where() rather than multiply: a masked-out inf or NaN must not leak into the sum.
    masked = torch.where(mask > 0, loss_mat, torch.zeros_like(loss_mat))  # [B, T]

    if mode == "token-mean":
        if num_tokens is None:
            denom = mask.sum()
        else:
            denom = torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
        return masked.sum() / denom.clamp(min=1)

    lengths = row_lengths(mask)  # [B]
    seq_sum = masked.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / lengths.clamp(min=1)  # [B]
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum  # [B]
    else:
        constant = float(loss_mat.shape[-1]) if norm is None else float(norm)
        if constant <= 0:
            raise ValueError(f"norm must be positive, got {norm}")
        per_seq = seq_sum / constant  # [B]
    if num_seqs is None:
        denom = (lengths > 0).sum().to(mask.dtype)
    else:
        denom = torch.as_tensor(num_seqs, dtype=mask.dtype, device=mask.device)
    return per_seq.sum() / denom.clamp(min=1)
