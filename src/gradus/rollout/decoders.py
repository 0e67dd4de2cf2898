"""Incremental decoders used by `LocalEngine`: prefill the prompts, then one token per step.

Two implementations with one contract (`prefill`, `step`, `keep`), both returning float next-token logits:

- `HFDecoder` calls the model's own forward with a `DynamicCache`: works for any causal LM, and is the
  exact reference the fast path is tested against.
- `DirectDecoder` runs the decoder layers of stock Llama / Qwen2 models itself, with the same weights
  and the same arithmetic as their HF forward, but without its per-step overhead: a pre-allocated
  KV cache (no `torch.cat` per layer per step), cos/sin of every position computed once, the key
  padding mask built once, no mask-building, output records or hooks per step, and one shared rotary
  call for q and k. On tiny models per-step overhead is most of the cost, so this is where speed is won.
  Also: decode attention as matmul-softmax-matmul with an additive padding bias (fp32), the residual
  adds folded into addmm, and a packed prefill (matmuls on real prompt tokens only; the last layer for
  each prompt's last token only).

Position ids follow the gradus convention (`(mask.cumsum(-1) - 1).clamp(min=0)`), like HF `generate`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from gradus.logprobs import base_model, position_ids_from_mask

_DIRECT_MODELS = {"Qwen2ForCausalLM": "Qwen2", "LlamaForCausalLM": "Llama"}
_STATIC_ROPE = {"default", "linear", "llama3"}  # inv_freq does not depend on the sequence seen so far


# Config fields whose non-neutral value means layers the fast path does not compute.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
_ATTENTION_KINDS = {None, "eager", "sdpa"}  # the HF attentions whose maths DirectDecoder reproduces


def _wrapper_reason(model: nn.Module) -> str | None:
    """Why `model` is not a bare HF model: a DDP, FSDP2 or PEFT wrapper, or None."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "the model is wrapped by DistributedDataParallel"
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return "the model is a PEFT model (adapters)"
    if type(model).__name__.startswith("FSDP") or any(type(m).__name__.startswith("FSDP") for m in model.modules()):
        return "the model is sharded by FSDP2 (fully_shard)"
    return None


def _module_reason(model: nn.Module) -> str | None:
    """Why the modules of a stock-looking model are not the ones DirectDecoder reads: hooks, injected
    layers (LoRA, parametrisations), quantised or mixed-dtype weights; None when they are plain."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return "global forward hooks are registered"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or type(model).__name__} has forward hooks"
        if hasattr(module, "parametrizations"):
            return f"module {name} has parametrisations"
    for name, param in model.named_parameters():
        if type(param) is not nn.Parameter or not param.dtype.is_floating_point:
            return f"parameter {name} is {type(param).__name__} of {param.dtype} (quantised or sharded)"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        return f"the parameters have several dtypes {sorted(map(str, dtypes))}"
    inner = model.model
    if type(inner.embed_tokens) is not nn.Embedding or type(model.lm_head) is not nn.Linear:
        return "the embedding or the lm head is not a plain nn.Embedding / nn.Linear"
    for i, layer in enumerate(inner.layers):
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for proj in names:
                kind = type(getattr(getattr(layer, part), proj, None))
                if kind is not nn.Linear:
                    return f"layers.{i}.{part}.{proj} is {kind.__name__}, not nn.Linear (an adapter or injected layer)"
    return None


def direct_unsupported_reason(model: nn.Module) -> str | None:
    """Why `DirectDecoder` cannot run `model` exactly, or None when it can. It reads the weights of
    stock dense Llama / Qwen2 layers itself, so anything else is refused: wrapped or hooked modules,
    adapters, quantised weights, mixture-of-experts layers, other attention or rope variants."""
    if (reason := _wrapper_reason(model)) is not None:
        return reason
    prefix = _DIRECT_MODELS.get(type(model).__name__)
    if prefix is None:
        return f"model class {type(model).__name__} is not one of {sorted(_DIRECT_MODELS)}"
    config = model.config
    if getattr(config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None) is not None:
        return "the model is quantised"
    for field in _MOE_FIELDS:
        if getattr(config, field, None):
            return f"mixture-of-experts layers (config.{field}={getattr(config, field)!r})"
    if getattr(config, "_attn_implementation", None) not in _ATTENTION_KINDS:
        return f"attention implementation {config._attn_implementation!r} is not eager or sdpa"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window attention layers"
    if getattr(model.model.rotary_emb, "rope_type", "default") not in _STATIC_ROPE:
        return f"rope type {model.model.rotary_emb.rope_type!r} is not static"
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        return f"partial rotary embeddings (partial_rotary_factor={partial})"
    expected = {"layer": "DecoderLayer", "self_attn": "Attention", "mlp": "MLP",
                "input_layernorm": "RMSNorm", "post_attention_layernorm": "RMSNorm"}
    for layer in model.model.layers:
        for name, suffix in expected.items():
            module = layer if name == "layer" else getattr(layer, name, None)
            if type(module).__name__ != prefix + suffix:
                return f"{name} is {type(module).__name__}, not the stock {prefix + suffix}"
    if type(model.model.norm).__name__ != prefix + "RMSNorm":
        return "final norm is not the stock RMSNorm"
    return _module_reason(model)


class HFDecoder:
    """Exact fallback for any causal LM: the model's forward with a DynamicCache."""

    def __init__(self, model: nn.Module, max_new_tokens: int) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens
        # the signature of the causal LM inside any wrapper (PEFT's forward takes **kwargs and passes them on)
        params = inspect.signature(base_model(model).forward).parameters
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers 5.x renamed the cache argument `past_key_values` -> `cache` (the old name warns
        # and goes in 5.40); models whose forward predates the rename (remote code) still take the old one.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> torch.Tensor:
        """ids, mask: [N, P] left-padded unique prompts; returns logits [N*repeats, V] of the next token."""
        self.cache = DynamicCache(config=self.model.config)
        pos = position_ids_from_mask(mask)  # [N, P]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self._cache_arg: self.cache}, **self._keep_kw)
        if repeats > 1:
            self.cache.batch_repeat_interleave(repeats)
        full = torch.cat([mask, mask.new_ones(mask.shape[0], self.max_new_tokens)], dim=1)  # [N, P+T]
        self.mask = full.repeat_interleave(repeats, dim=0)  # [B, P+T]
        self.next_pos = (pos[:, -1] + 1).repeat_interleave(repeats)  # [B]
        self.length = ids.shape[1]  # columns held in the cache
        return out.logits[:, -1].float().repeat_interleave(repeats, dim=0)  # [B, V]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] the last sampled tokens; returns logits [B, V] of the next ones."""
        self.length += 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask[:, : self.length],
                         position_ids=self.next_pos[:, None], use_cache=True, **{self._cache_arg: self.cache})
        self.next_pos = self.next_pos + 1  # [B]
        return out.logits[:, -1].float()  # [B, V]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every batch row not in `rows` (sorted indices) from the cache and the bookkeeping."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask.index_select(0, rows)  # [R, P+T]
        self.next_pos = self.next_pos.index_select(0, rows)  # [R]


def _cat_weights(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (weight, bias) for several Linear layers on the same input: outputs concatenated."""
    weight = torch.cat([lin.weight for lin in linears])  # [sum out, in]
    if all(lin.bias is None for lin in linears):
        return weight, None
    bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])  # [sum out]
    return weight, bias


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same arithmetic as Qwen2RMSNorm / LlamaRMSNorm (normalise in float32, scale in the input dtype)."""
    if x.dtype == torch.float32:  # the fused op, same formula, one call
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _Weights(NamedTuple):
    """One decoder layer's parameters, fused where one matmul can replace several (see DirectDecoder)."""

    w_in: torch.Tensor  # input RMSNorm scale [H]
    eps_in: float
    w_qkv: torch.Tensor  # [(Hq+2Hkv)*D, H]
    b_qkv: torch.Tensor | None
    w_o_t: torch.Tensor  # [Hq*D, H] (a transposed view: addmm takes it as is)
    b_o: torch.Tensor | None
    w_post: torch.Tensor  # post-attention RMSNorm scale [H]
    eps_post: float
    w_gu: torch.Tensor  # [2I, H]
    b_gu: torch.Tensor | None
    w_d_t: torch.Tensor  # [I, H] (transposed view)
    b_d: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]


def _add_linear(x: torch.Tensor, h: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x + h @ w_t (+ b): the residual add rides in the GEMM (addmm), one op instead of two."""
    out = torch.addmm(x, h, w_t)  # [M, H]
    return out if b is None else out.add_(b)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per row: q [B, Hkv, G, D] (the G query heads of each kv head), k, v [B, Hkv, t, D],
    bias [B, 1, 1, t] additive (0 = attend, -inf = padding); returns [B, Hkv, G, D].

    Plain matmul-softmax-matmul: for a single query, the CPU flash kernel of scaled_dot_product_attention
    is slower than this (its tiling is built for long queries), and grouping q heads by kv head handles
    GQA without copying k, v. Same formula as HF's eager attention, fp32 throughout.
    """
    scores = torch.add(bias, torch.matmul(q, k.transpose(-1, -2)), alpha=scale)  # [B, Hkv, G, t]
    return torch.matmul(scores.softmax(dim=-1), v)  # [B, Hkv, G, D]

class DirectDecoder:
    """Stock Llama / Qwen2 decoding with a static KV cache; see the module docstring."""

    def __init__(self, model: nn.Module, max_new_tokens: int) -> None:
        reason = direct_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"DirectDecoder cannot run this model exactly: {reason}")
        self.model = model
        self.max_new_tokens = max_new_tokens
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = model.config.num_attention_heads
        self.n_kv = model.config.num_key_value_heads
        self.scaling = attn.scaling
        # q/k/v and gate/up are fused into one matmul each (fewer calls per step; each output element
        # is still one dot product over the same weights). The fused copies are rebuilt every generate
        # call, so they always match the live weights the trainer updates in place.
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Weights(
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                *_cat_weights(a.q_proj, a.k_proj, a.v_proj), a.o_proj.weight.t(), a.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                *_cat_weights(m.gate_proj, m.up_proj), m.down_proj.weight.t(), m.down_proj.bias,
                F.silu if isinstance(m.act_fn, nn.SiLU) else m.act_fn,
            ))

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> torch.Tensor:
        """ids, mask: [N, P] left-padded unique prompts; returns logits [N*repeats, V] of the next token."""
        N, P = ids.shape
        L = P + self.max_new_tokens
        device = ids.device
        valid = mask.bool()  # [N, P]
        pos = position_ids_from_mask(mask)  # [N, P]
        gen_pos = pos[:, -1:] + 1 + torch.arange(self.max_new_tokens, device=device)  # [N, T]
        probe = self.model.model.embed_tokens.weight[:1]  # rotary_emb reads only dtype and device from it
        dtype = probe.dtype
        cos, sin = self.model.model.rotary_emb(probe, torch.cat([pos, gen_pos], dim=1))  # [N, L, D] each
        half = self.head_dim // 2
        # rotate_half(q) * sin == roll(q, D/2) * [-sin_1, sin_2]: negation is exact, so this is the
        # same arithmetic as HF's apply_rotary_pos_emb with one op fewer per call.
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # [N, L, D]
        self.cos, self.sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [N, L, 1, D]
        # Prefill mask: causal and key not padding; a padding query attends itself only, so that
        # no softmax row is empty (NaN) while real queries never see padding.
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()  # [P, P]
        eye = torch.eye(P, dtype=torch.bool, device=device)  # [P, P]
        pre_mask = (causal & valid[:, None, None, :]) | eye  # [N, 1, P, P]
        key_valid = torch.cat([valid, valid.new_ones(N, self.max_new_tokens)], dim=1)  # [N, L]
        # decode steps add this to the attention scores: 0 where a key is real, -inf on prompt padding
        bias = torch.zeros(N, 1, 1, L, dtype=dtype, device=device)  # [N, 1, 1, L]
        self.bias = bias.masked_fill(~key_valid[:, None, None, :], float("-inf"))  # [N, 1, 1, L]
        kv_shape = (N, self.n_kv, L, self.head_dim)
        self.k_cache = [torch.empty(kv_shape, dtype=dtype, device=device) for _ in self.layers]  # [N, Hkv, L, D]
        self.v_cache = [torch.empty(kv_shape, dtype=dtype, device=device) for _ in self.layers]  # [N, Hkv, L, D]
        h = self._prefill_layers(ids, valid, pre_mask)  # [N, H]
        self.length = P
        if repeats > 1:
            self._repeat(repeats)
        last = h.repeat_interleave(repeats, dim=0)  # [B, H]
        return self._logits(last)  # [B, V]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] the last sampled tokens; returns logits [B, V] of the next ones."""
        t = self.length  # cache column of these tokens
        x = self.model.model.embed_tokens(tokens)  # [B, H]
        B = x.shape[0]
        cos, sin = self.cos[:, t], self.sin[:, t]  # [B, 1, D]
        bias = self.bias[..., : t + 1]  # [B, 1, 1, t+1]
        nq, nkv, D = self.n_heads, self.n_kv, self.head_dim
        for w, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            h = _rms_norm(x, w.w_in, w.eps_in)  # [B, H]
            qkv = F.linear(h, w.w_qkv, w.b_qkv).view(B, nq + 2 * nkv, D)  # [B, Hq+2Hkv, D]
            qk = qkv[:, : nq + nkv]  # [B, Hq+Hkv, D] rotary on q and k in one go
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)  # [B, Hq+Hkv, D]
            k_cache[:, :, t] = qk[:, nq:]  # [B, Hkv, D]
            v_cache[:, :, t] = qkv[:, nq + nkv:]  # [B, Hkv, D]
            k, v = k_cache[:, :, : t + 1], v_cache[:, :, : t + 1]  # [B, Hkv, t+1, D]
            if x.dtype == torch.float32:
                a = _decode_attention(qk[:, :nq].view(B, nkv, nq // nkv, D), k, v, bias, self.scaling)
            else:  # low precision: the fused kernel keeps the scores in fp32, as HF's forward does
                a = F.scaled_dot_product_attention(qk[:, :nq, None], k, v, attn_mask=bias, scale=self.scaling,
                                                   enable_gqa=nq != nkv)  # [B, Hq, 1, D]
            x = _add_linear(x, a.reshape(B, nq * D), w.w_o_t, w.b_o)  # [B, H]
            x = self._mlp(x, w)  # [B, H]
        self.length = t + 1
        return self._logits(x)  # [B, V]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every batch row not in `rows` from the cache and the bookkeeping."""
        self.k_cache = [k.index_select(0, rows) for k in self.k_cache]
        self.v_cache = [v.index_select(0, rows) for v in self.v_cache]
        self.cos, self.sin = self.cos.index_select(0, rows), self.sin.index_select(0, rows)
        self.bias = self.bias.index_select(0, rows)

    def _repeat(self, n: int) -> None:
        self.k_cache = [k.repeat_interleave(n, dim=0) for k in self.k_cache]  # [B, Hkv, L, D]
        self.v_cache = [v.repeat_interleave(n, dim=0) for v in self.v_cache]  # [B, Hkv, L, D]
        self.cos, self.sin = self.cos.repeat_interleave(n, dim=0), self.sin.repeat_interleave(n, dim=0)
        self.bias = self.bias.repeat_interleave(n, dim=0)  # [B, 1, 1, L]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.model.model.norm
        h = _rms_norm(h, norm.weight, norm.variance_epsilon)  # [B, H]
        head = self.model.lm_head
        return F.linear(h, head.weight, head.bias).float()  # [B, V]

    @staticmethod
    def _mlp(x: torch.Tensor, w: _Weights) -> torch.Tensor:
        """x + MLP(RMSNorm(x)) for x [M, H]."""
        h = _rms_norm(x, w.w_post, w.eps_post)  # [M, H]
        gate, up = F.linear(h, w.w_gu, w.b_gu).chunk(2, dim=-1)  # [M, I] each
        return _add_linear(x, w.act(gate) * up, w.w_d_t, w.b_d)  # [M, H]

    def _prefill_layers(self, ids: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run all layers on the prompts ids [N, P] (valid: [N, P] bool), filling cache columns 0..P-1;
        returns the last layer's output at each prompt's last token, [N, H].

        Two savings over a padded forward, both exact per token: the matmuls see only the real tokens
        (packed, [M, H] with M = valid.sum(); a third of the rows in the benchmark are padding), which are
        scattered into the padded layout for attention only; and the last layer runs attention, o_proj
        and the MLP for the last token of each prompt alone, since only its output and the layer's k, v
        (computed for every token) are used.
        """
        N, P = ids.shape
        nq, nkv, D = self.n_heads, self.n_kv, self.head_dim
        flat = valid.flatten().nonzero().squeeze(1)  # [M] packed token -> padded position n*P + p
        x = self.model.model.embed_tokens(ids.flatten()[flat])  # [M, H]
        cos = self.cos[:, :P].reshape(N * P, 1, D)[flat]  # [M, 1, D]
        sin = self.sin[:, :P].reshape(N * P, 1, D)[flat]  # [M, 1, D]
        last = valid.sum(1).cumsum(0) - 1  # [N] packed index of each prompt's last token (left padding)
        # q, k, v in the padded layout; padding stays 0 (finite: masked keys, discarded queries)
        padded = x.new_zeros(N * P, nq + 2 * nkv, D)  # [N*P, Hq+2Hkv, D]
        for i, (w, k_cache, v_cache) in enumerate(zip(self.layers, self.k_cache, self.v_cache, strict=True)):
            h = _rms_norm(x, w.w_in, w.eps_in)  # [M, H]
            qkv = F.linear(h, w.w_qkv, w.b_qkv).view(-1, nq + 2 * nkv, D)  # [M, Hq+2Hkv, D]
            qk = qkv[:, : nq + nkv]  # [M, Hq+Hkv, D]
            padded[flat, : nq + nkv] = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin)
            padded[flat, nq + nkv:] = qkv[:, nq + nkv:]
            grid = padded.view(N, P, nq + 2 * nkv, D)  # [N, P, Hq+2Hkv, D]
            k_cache[:, :, :P] = grid[:, :, nq: nq + nkv].transpose(1, 2)  # [N, Hkv, P, D]
            v_cache[:, :, :P] = grid[:, :, nq + nkv:].transpose(1, 2)  # [N, Hkv, P, D]
            final = i == len(self.layers) - 1
            queries = grid[:, -1:] if final else grid  # [N, S, Hq+2Hkv, D] S = 1 or P
            a = F.scaled_dot_product_attention(
                queries[:, :, :nq].transpose(1, 2), k_cache[:, :, :P], v_cache[:, :, :P],
                attn_mask=mask[:, :, -1:] if final else mask, scale=self.scaling, enable_gqa=nq != nkv,
            )  # [N, Hq, S, D]
            a = a.transpose(1, 2).reshape(-1, nq * D)  # [N*S, Hq*D]
            if final:
                x = x[last]  # [N, H]
            else:
                a = a[flat]  # [M, Hq*D]
            x = _add_linear(x, a, w.w_o_t, w.b_o)  # [M or N, H]
            x = self._mlp(x, w)  # [M or N, H]
        return x  # [N, H]
