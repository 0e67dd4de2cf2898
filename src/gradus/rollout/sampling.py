"""Pure, vectorised sampling functions on a [B, V] block of next-token logits.

The order matches HF `generate`: temperature, then top-k, then top-p. Filtering sets the logits of
removed tokens to -inf; the log-prob recorded for training is taken from the UNFILTERED tempered
distribution (see `RolloutBatch`), so filtering only decides which token is drawn.
"""

from __future__ import annotations

import torch

from gradus.rollout.types import SamplingParams


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature; temperature 0 (greedy) leaves the logits as they are."""
    if temperature == 0.0 or temperature == 1.0:
        return logits
    return logits / temperature  # [B, V]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th value are kept too); k = 0 is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))  # [B, V]


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of tokens, by decreasing probability, whose mass is >= p.

    A token is removed when the mass of the tokens strictly more likely than it (in sort order) already
    reaches p; the most likely token is therefore always kept. p = 1 is off.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of the tokens ranked above
    remove_sorted = mass_before >= p  # [B, V]
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # [B, V] back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))  # [B, V]


def _signed(x: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014) on int64 tensors; multiplication wraps mod 2^64."""
    x = (x ^ _shift_right(x, 30)) * _M1
    x = (x ^ _shift_right(x, 27)) * _M2
    return x ^ _shift_right(x, 31)


def row_keys(base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A key per row from a per-prompt key `base` and the sample's index in its group: [B] int64 each."""
    return mix64(base.long() * _GOLDEN + index.long())


def row_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """One U[0, 1) float64 per row, a pure function of (row key, decode step): [B] int64 -> [B].

    Counter-based, like Philox: a completion's random numbers depend only on its key, never on which
    other rows share the batch, their order, the device or the rank that samples it.
    """
    bits = mix64(mix64(keys + _signed((step + 1) * _GOLDEN % (1 << 64))))  # [B]
    return _shift_right(bits, 11).double() * (1.0 / (1 << 53))  # 53 random bits -> [0, 1)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None,
                      uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row with probability proportional to probs [B, V] (rows need not sum to 1).

    Inverse-CDF sampling: the first token whose cumulative mass exceeds u ~ U[0, total). It is several
    times faster than torch.multinomial on small batches. u is kept strictly below the total, so the
    chosen token always has c[i-1] <= u < c[i], i.e. positive probability (filtered tokens never win).
    `uniforms` [B] in [0, 1) (from `row_uniforms`) replace the draws from `generator` when given.
    """
    cdf = probs.cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1:]  # [B, 1]
    if uniforms is None:
        uniforms = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)  # [B, 1]
    u = uniforms.reshape(total.shape).to(cdf.dtype) * total  # [B, 1]
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # [B, 1] guard u*total rounding up
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # [B]


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the next token of every row and its log-prob under the full tempered distribution.

    logits: [B, V] (any float dtype; computed in float32). Returns (tokens [B] long, logp [B] float32).
    Greedy (temperature 0) takes the argmax and reports the log-prob at temperature 1. The draw uses
    `uniforms` [B] when given (see `row_uniforms`), else `generator`.
    """
    logits = logits.float()  # [B, V]
    if params.greedy:
        tokens = logits.argmax(dim=-1)  # [B]
        logp_all = logits.log_softmax(dim=-1)  # [B, V]
    else:
        scaled = apply_temperature(logits, params.temperature)  # [B, V]
        logp_all = scaled.log_softmax(dim=-1)  # [B, V]
        filtered = top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)  # [B, V]
        # unfiltered: exp(log-probs) are the probabilities already, saving a softmax
        probs = logp_all.exp() if filtered is scaled else filtered.softmax(dim=-1)  # [B, V]
        tokens = sample_from_probs(probs, generator, uniforms)  # [B]
    logp = logp_all.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [B]
    return tokens, logp
