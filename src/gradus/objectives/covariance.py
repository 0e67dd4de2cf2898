"""The covariance of log-probability and advantage per token: the driver of entropy change, its
diagnostics, and the token selections of Clip-Cov and KL-Cov.

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv 2505.22617): under policy gradient the change of the policy's entropy is, to first order, minus
the covariance between a token's log-probability and its advantage. Over the N counted tokens of a
batch, each token's centred cross-product is

    c_t = (log pi(y_t) - mean_s log pi(y_s)) * (A_t - mean_s A_s),      Cov = mean_t c_t

A positive Cov (confident tokens rewarded, unlikely ones punished) lowers the entropy; the paper finds
it stays positive, hence entropy collapse. Its two fixes act on the few tokens of largest c_t:

- Clip-Cov (section 5.2): among the tokens PPO's clip left alone, those with omega_low < c_t < omega_high
  are candidates; r N of them (at least 1), drawn uniformly at random, lose their gradient.
- KL-Cov (section 5.3): the k N tokens (at least 1) of largest c_t get a penalty beta |log r_t|; here only
  tokens with c_t > 0 are eligible (verl takes the top k N whatever their sign, so a batch whose
  advantages are all equal, c_t = 0 everywhere, has arbitrary tokens penalised).

The paper's values: r = 2e-4, omega = (1, 5), k = 2e-3 (2e-4 for its 32B model), beta = 1 (verl 0.9's
defaults: 2e-4 for both fractions). Means and selections are over the tokens passed in (a micro-batch
in a trainer, as in verl).
"""

from __future__ import annotations

import torch

from gradus.objectives._tensor import at_least_fp32, check_shapes, masked_mean, masked_min_max, per_token


@torch.no_grad()
def token_covariance(logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """c_t over the counted tokens, 0 elsewhere (detached). logp [B, T], advantages [B] or [B, T] -> [B, T]"""
    check_shapes("logp", logp, loss_mask=loss_mask)
    lp = at_least_fp32(logp.detach())  # [B, T]
    adv = per_token(at_least_fp32(advantages.detach()), lp).to(lp.dtype)  # [B, T]
    mask = loss_mask.to(lp.dtype)  # [B, T]
    counted = mask > 0  # [B, T]
    lp = torch.where(counted, lp, torch.zeros_like(lp))  # [B, T] no -inf from padding in the means
    adv = torch.where(counted, adv, torch.zeros_like(adv))  # [B, T]
    cov = _centred(lp, mask) * _centred(adv, mask)  # [B, T]
    return torch.where(counted, cov, torch.zeros_like(cov))  # [B, T]


def _centred(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x minus its mean over counted entries; exactly 0 when they are all equal (their float mean can differ
    from them in the last bit, which would make every c_t a tiny nonzero number). [B, T] -> [B, T]"""
    low, high = masked_min_max(x, mask)
    return torch.where(low == high, torch.zeros_like(x), x - masked_mean(x, mask))


@torch.no_grad()
def covariance_metrics(
    logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor, *, band: tuple[float, float] = (1.0, 5.0)
) -> dict[str, torch.Tensor]:
    """The entropy diagnostics of Cui et al. 2025 over the counted tokens (0-dim tensors, 0 when nothing counts):

    - cov_mean: Cov, the mean of c_t (positive: entropy is being spent)
    - cov_max: the largest c_t; cov_q99, cov_q999: its 99th and 99.9th percentiles, where Clip-Cov and
      KL-Cov act (they touch the top 0.02% to 0.2% of tokens)
    - cov_band_frac: share of tokens with c_t inside Clip-Cov's band (omega_low, omega_high), its candidates
    """
    cov = token_covariance(logp, advantages, loss_mask)  # [B, T]
    mask = loss_mask.to(cov.dtype)  # [B, T]
    counted = cov[mask > 0]  # [N]
    zero = cov.new_zeros(())
    in_band = ((cov > band[0]) & (cov < band[1])).to(cov.dtype)  # [B, T]
    stats = {"cov_mean": masked_mean(cov, mask), "cov_band_frac": masked_mean(in_band, mask),
             "cov_max": masked_min_max(cov, mask)[1]}
    if counted.numel():
        q = torch.quantile(counted, torch.tensor([0.99, 0.999], dtype=cov.dtype, device=cov.device))  # [2]
        stats["cov_q99"], stats["cov_q999"] = q[0], q[1]
    else:
        stats["cov_q99"] = stats["cov_q999"] = zero
    return stats


def selection_size(frac: float, loss_mask: torch.Tensor) -> int:
    """How many tokens a covariance method touches: frac of the counted tokens, at least 1."""
    return max(int(frac * loss_mask.sum().item()), 1)


@torch.no_grad()
def clip_cov_selection(
    cov: torch.Tensor,
    candidates: torch.Tensor,
    frac: float,
    loss_mask: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip-Cov's detached tokens: min(selection_size, #candidates) of the candidate positions, drawn
    uniformly without replacement (torch.randperm over the candidates in row-major order).

    Args:
        cov: c_t. [B, T]
        candidates: counted tokens PPO's clip left alone with omega_low < c_t < omega_high. [B, T] bool
        generator: the source of the draw; None: torch's global generator (as verl).
    Returns:
        selected [B, T] bool.
    """
    index = torch.nonzero(candidates)  # [C, 2]
    selected = torch.zeros_like(candidates)  # [B, T]
    if len(index):
        order = torch.randperm(len(index), generator=generator, device="cpu").to(index.device)  # [C]
        chosen = index[order[: selection_size(frac, loss_mask)]]  # [k, 2]
        selected[chosen[:, 0], chosen[:, 1]] = True
    return selected


@torch.no_grad()
def kl_cov_selection(cov: torch.Tensor, frac: float, loss_mask: torch.Tensor) -> torch.Tensor:
    """KL-Cov's penalised tokens: the selection_size counted tokens of largest c_t, among those with c_t > 0
    (a token that does not lower the entropy is not penalised: when all advantages are equal, none is).
    [B, T] -> [B, T] bool"""
    eligible = (loss_mask > 0) & (cov > 0)  # [B, T]
    selected = torch.zeros_like(eligible)  # [B, T]
    n = int(eligible.sum().item())
    if n:
        flat = torch.nonzero(eligible.reshape(-1)).squeeze(-1)  # [E] eligible positions, row-major
        top = torch.topk(cov.reshape(-1)[flat], min(selection_size(frac, loss_mask), n)).indices  # [k]
        selected.view(-1)[flat[top]] = True
    return selected
