"""`LocalEngine`: batched sampling in-process with the policy model itself.

Per `generate` call:
1. Left-pad the unique prompts and prefill them once; the KV cache is then repeated n times (the n
   completions of a prompt share its prefill).
2. Decode one token per step for all live rows; log-probs come from the full tempered distribution.
3. Rows that emit an EOS id are finished; once enough of them have piled up they are dropped from
   the batch and the KV cache, so finished rows stop costing compute.
4. On a mixture-of-experts model known to `models/routing.py`, the experts every token was routed to
   are recorded as the rollout computed them (`RolloutBatch.routed_experts`, `rollout/routing_record.py`);
   dense models are not hooked and get None.

The decoder is `DirectDecoder` (fast, exact, stock Llama / Qwen2) when it supports the model, else
`HFDecoder` (the model's own forward). The sampled tokens are the same either way, up to float
rounding in the last bits of the logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from gradus.models.routing import moe_layout_or_none
from gradus.rollout.decoders import DirectDecoder, HFDecoder, direct_unsupported_reason
from gradus.rollout.engine import Engine, PolicySource, Weights
from gradus.rollout.routing_record import RolloutRouting, record_routing
from gradus.rollout.sampling import next_tokens, row_keys, row_uniforms
from gradus.rollout.types import RolloutBatch, SamplingParams

if TYPE_CHECKING:
    from gradus.config import TrainConfig

Backend = Literal["auto", "direct", "hf"]
log = logging.getLogger("gradus.rollout")
_FALLBACKS_LOGGED: set[str] = set()  # reasons already logged: one line per reason per process

# Dropping rows copies the whole KV cache, so wait until this fraction of the live rows has finished
# (finished rows still decode meanwhile; their tokens are discarded).
_DROP_FRACTION = 0.125


def config_positions(config: Any) -> int | None:
    """The longest sequence (prompt + completion) a model config allows (a config object or the dict
    of its config.json); None when it does not say."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_positions(model: nn.Module) -> int | None:
    """The longest sequence (prompt + completion) the model's config allows; None when it does not say."""
    return config_positions(getattr(model, "config", None))


def prompt_seeds(count: int, n: int, seed: int | None, seeds: Sequence[int] | None) -> list[int]:
    """The per-prompt keys of a `generate` call (checked): `seeds` as given, else (seed, j) mixed; without
    either, a seed drawn from torch's global RNG (so torch.manual_seed still governs it)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seeds is not None:
        if len(seeds) != count:
            raise ValueError(f"seeds has {len(seeds)} entries for {count} prompts")
        return list(seeds)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return [seed * 1_000_003 + j for j in range(count)]


def completion_keys(seeds: Sequence[int], n: int, device: torch.device) -> torch.Tensor:
    """[len(seeds) * n] int64: the key of completion s of prompt j at row j*n + s (see sampling.row_keys)."""
    base = torch.tensor([int(s) & 0x7FFFFFFFFFFFFFFF for s in seeds], dtype=torch.long, device=device)
    return row_keys(base.repeat_interleave(n), torch.arange(n, device=device).repeat(len(seeds)))


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids [N, P] long, mask [N, P] long), left-padded to the longest prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)  # [N, P]
    mask = torch.zeros(len(prompts), P, dtype=torch.long)  # [N, P]
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


class LocalEngine(Engine):
    """Samples completions with `model` (a HF causal LM) in this process; implements `RolloutEngine`.

    Built for a run (`build`), it samples with the policy's own module when it can, and else keeps a copy of
    its own, refreshed by `sync`: in `rollout.dtype` when that differs from the policy's, a whole copy of an
    FSDP2-sharded policy, and the merged weights of a LoRA policy (so the fast decoder runs it: a PEFT
    model's forward adds each adapter in every layer at every token)."""

    name: ClassVar[str] = "local"
    records_routing: ClassVar[bool] = True  # MoE models known to models/routing.py

    @classmethod
    def build(cls, cfg: TrainConfig, source: PolicySource, tokenizer: Any, device: torch.device) -> LocalEngine:
        from gradus.models import DTYPES, stop_token_ids

        dtype = DTYPES[cfg.rollout.dtype or cfg.model.dtype]
        copy = source.sharded or source.adapted or dtype != source.dtype
        model = source.blueprint(dtype) if copy else source.module
        engine = cls(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=stop_token_ids(source.module, tokenizer))
        engine.holds_weights = copy
        return engine

    def __init__(self, model: nn.Module, *, pad_token_id: int, eos_token_ids: Sequence[int] | int,
                 backend: Backend = "auto") -> None:
        if backend not in ("auto", "direct", "hf"):
            raise ValueError(f"backend must be 'auto', 'direct' or 'hf', got {backend!r}")
        if backend == "direct" and (reason := direct_unsupported_reason(model)) is not None:
            raise ValueError(f"backend 'direct' cannot run this model: {reason}")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        self.eos_token_ids = [int(e) for e in eos]
        self.backend = backend
        self._moe = moe_layout_or_none(model)  # routers to record; None for a dense model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def uses_direct(self) -> bool:
        """Whether generate runs the fast `DirectDecoder` (else the model's own forward). With backend
        "auto", a model the fast path cannot run exactly falls back, and the log says why (once per reason)."""
        if self.backend != "auto":
            return self.backend == "direct"
        reason = direct_unsupported_reason(self.model)
        if reason is not None and reason not in _FALLBACKS_LOGGED:
            _FALLBACKS_LOGGED.add(reason)
            log.warning("rollout: the fast decoder cannot run this model exactly (%s); sampling with the "
                        "model's own forward", reason)
        return reason is None

    def sync(self, weights: Weights) -> None:
        """Copy weights into the engine's model, each into the parameter of its name, in that parameter's dtype
        (buffers, such as a rotary table, keep theirs). Every parameter must be given, and no other name."""
        params = dict(self.model.named_parameters(remove_duplicate=False))  # a tied head under both names
        seen = set()
        with torch.no_grad():
            for name, value in weights:
                if name not in params:
                    raise ValueError(f"sync: {name} is not a parameter of the engine's model")
                params[name].copy_(value)
                seen.add(name)
        if missing := sorted(set(params) - seen):
            raise ValueError(f"sync: no weights given for {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams, *,
                 seed: int | None = None, seeds: Sequence[int] | None = None) -> RolloutBatch:
        """n completions per prompt; rows j*n .. j*n+n-1 belong to prompts[j].

        Randomness is per completion: completion s of prompts[j] draws from a counter-based stream keyed by
        (seeds[j], s), so it is the same whatever else is in the batch (batch-invariant sampling: the
        trainer keys prompts by (run seed, step, example index), which no rank or world size changes).
        Without `seeds`, prompt j's key is (seed, j); without either, the seed is drawn from torch's RNG.
        """
        seeds = prompt_seeds(len(prompts), n, seed, seeds)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), record_routing(self.model, self._moe, params.max_new_tokens) as routing:
                batch = self._generate(prompts, n, params, seeds, routing)
        finally:
            self.model.train(was_training)
        # Inference tensors cannot enter autograd (the trainer embeds completion_ids), so hand back
        # ordinary copies, made outside inference mode.
        return batch.clone()

    def _generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                  seeds: Sequence[int], routing: RolloutRouting | None) -> RolloutBatch:
        device = self.device
        T = params.max_new_tokens
        positions = model_positions(self.model)
        longest = max((len(p) for p in prompts), default=0)
        if positions is not None and longest + T > positions:
            # refused before anything is allocated: past its positions a model fails or reads garbage
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {T} is more than the model's "
                             f"{positions} positions")
        ids, mask = left_pad(prompts, self.pad_token_id, device)  # [N, P] each
        B = ids.shape[0] * n
        keys = completion_keys(seeds, n, device)  # [B]
        decoder = (DirectDecoder if self.uses_direct() else HFDecoder)(self.model, T)
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)  # [E]

        out_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long, device=device)  # [B, T]
        out_logp = torch.zeros(B, T, dtype=torch.float32, device=device)  # [B, T]
        lengths = torch.full((B,), T, dtype=torch.long, device=device)  # [B] T unless an EOS comes
        rows = torch.arange(B, device=device)  # [R] original row of each live batch row
        done = torch.zeros(B, dtype=torch.bool, device=device)  # [R] emitted an EOS already
        live_len = torch.full((B,), T, dtype=torch.long, device=device)  # [R]

        logits = decoder.prefill(ids, mask, n)  # [B, V]
        if routing is not None:
            routing.prefill(n)
        steps = 0
        while True:
            uniforms = None if params.greedy else row_uniforms(keys[rows], steps)  # [R]
            tokens, logp = next_tokens(logits, params, uniforms=uniforms)  # [R], [R]
            out_ids[:, steps].index_copy_(0, rows, tokens)
            out_logp[:, steps].index_copy_(0, rows, logp)
            steps += 1
            if eos.numel() > 0:
                ended = torch.isin(tokens, eos) & ~done  # [R] first EOS of the row
                live_len = torch.where(ended, steps, live_len)  # [R]
                done = done | ended  # [R]
                n_done = int(done.sum().item())  # one host sync per step, as in HF generate
                if n_done == done.numel():
                    break
            if steps == T:
                break
            if eos.numel() > 0 and n_done >= max(1.0, _DROP_FRACTION * done.numel()):
                lengths.index_copy_(0, rows[done], live_len[done])
                keep = (~done).nonzero().squeeze(1)  # [R']
                decoder.keep(keep)
                rows, tokens = rows[keep], tokens[keep]  # [R']
                done, live_len = done[keep], live_len[keep]  # [R']
            logits = decoder.step(tokens)  # [R, V]
            if routing is not None:
                routing.step(rows, steps - 1)  # the forward just run fed the tokens sampled at column steps-1
        lengths.index_copy_(0, rows, live_len)

        completion_mask = (torch.arange(steps, device=device) < lengths[:, None]).long()  # [B, t]
        completion_ids = out_ids[:, :steps].masked_fill(completion_mask == 0, self.pad_token_id)  # [B, t]
        sampling_logp = out_logp[:, :steps] * completion_mask  # [B, t] 0 at padding
        last = completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # [B]
        truncated = ~torch.isin(last, eos)  # [B] no EOS at the end -> stopped by max_new_tokens
        prompt_mask = mask.repeat_interleave(n, dim=0)  # [B, P]
        return RolloutBatch(
            prompt_ids=ids.repeat_interleave(n, dim=0),  # [B, P]
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampling_logp=sampling_logp,
            lengths=lengths,
            truncated=truncated,
            prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(n),  # [B]
            pad_token_id=self.pad_token_id,
            routed_experts=None if routing is None else routing.finish(prompt_mask, lengths, steps),  # [B, P+t, L, k]
        )
