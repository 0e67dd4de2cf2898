"""Per-token log-probabilities of sampled tokens, in bounded memory.

Every objective in gradus (PPO, GRPO, DAPO, GSPO, SAPO) needs log π(o_t | q, o_<t) for the sampled
tokens only, not the whole [N, V] distribution. With V ~ 150k, materialising float32 logits for
N = 8 x 1024 tokens takes ~5 GB, and log_softmax plus its backward triples that. `token_logprobs`
instead walks the tokens `chunk_size` at a time:

- forward: logits of one chunk [C, V] in float32; keep only log p(target), the max logit and the
  sum of exp(logit - max) per token ([C] each);
- backward: recompute the chunk's logits from (hidden, weight), turn them into
  d log p / d logits = (onehot(target) - softmax) / temperature in place, and multiply out the
  gradients of hidden, weight and bias; the chunk buffer is freed before the next chunk.

Peak extra memory is one [chunk_size, V] buffer instead of several [N, V] ones (plus, for bf16
weights, a float32 copy of the [V, H] head and its gradient accumulator), for one more matmul per
chunk in backward (the logit recompute). Arithmetic is float32 (float64 for float64 inputs) whatever
the input dtype; gradients come back in the inputs' dtypes.

Position ids: gradus computes them from the attention mask as `cumsum(mask) - 1`, clamped at 0, so a
left-padded row gets the same positions as the unpadded one. This matches HF `generate` on left-padded
batches (which fills pad positions with 1 instead of 0; pad positions are masked out, so the value
there does not matter). The rollout engine uses the same `position_ids_from_mask`.
"""

from __future__ import annotations

import inspect

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens: [B, S] mask (1 = token) -> [B, S] int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, S]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (so gradcheck can run in double precision)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """(hidden @ weight^T + bias) / temperature for one chunk; hidden/weight/bias already in compute dtype."""
    if bias is None:
        logits = hidden @ weight.T  # [C, V]
    else:
        logits = torch.addmm(bias, hidden, weight.T)  # [C, V]
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ W^T / T)[target], chunked over tokens; the entropy output has no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        dtype = _compute_dtype(hidden, weight, bias)
        n_tokens = hidden.shape[0]
        logp = hidden.new_empty(n_tokens, dtype=dtype)  # [N]
        # Per token, max logit m and sum of exp(z - m) (not their combination m + log sum: the
        # rounding of that sum would cost backward up to ~|m| ulps of accuracy in every probability).
        row_max = hidden.new_empty(n_tokens, dtype=dtype)  # [N]
        total = hidden.new_empty(n_tokens, dtype=dtype)  # [N]
        entropy = hidden.new_empty(n_tokens if with_entropy else 0, dtype=dtype)  # [N] or [0]
        # Autocast would run the matmul in bf16; the point here is float32 logits.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, H]; no copy when weight is already in dtype
            b = None if bias is None else bias.to(dtype)  # [V]
            for start in range(0, n_tokens, chunk_size):
                stop = min(start + chunk_size, n_tokens)
                logits = _chunk_logits(hidden[start:stop].to(dtype), w, b, temperature)  # [C, V]
                target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)  # [C]
                chunk_max = logits.amax(dim=1)  # [C]
                shifted = logits.sub_(chunk_max[:, None])  # [C, V], in place: z - m
                if with_entropy:
                    exp = shifted.exp()  # [C, V]
                    chunk_total = exp.sum(dim=1)  # [C]
                    # H = log sum_v e^z - sum_v p_v z_v = log(total) - sum_v exp_v (z_v - m) / total
                    weighted = exp.mul_(shifted).sum(dim=1)  # [C]
                    entropy[start:stop] = chunk_total.log() - weighted / chunk_total
                else:
                    chunk_total = shifted.exp_().sum(dim=1)  # [C]
                row_max[start:stop] = chunk_max
                total[start:stop] = chunk_total
                logp[start:stop] = (target_logit - chunk_max) - chunk_total.log()
                # Free the [C, V] buffer now, or the next chunk's is allocated while this one lives.
                del logits, shifted
                if with_entropy:
                    del exp
        ctx.save_for_backward(hidden, weight, bias, targets, row_max, total)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, row_max, total = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = total.dtype
        n_tokens = hidden.shape[0]
        grad_hidden = grad_weight = grad_bias = None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, H]
            b = None if bias is None else bias.to(dtype)  # [V]
            # d logp / d z = (onehot - p) / T where z = hidden @ W^T + b; fold 1/T into the upstream grad.
            scale = grad_logp.to(dtype) / ctx.temperature  # [N]
            if need_hidden:
                grad_hidden = hidden.new_empty(hidden.shape, dtype=dtype)  # [N, H]
            if need_weight:
                grad_weight = torch.zeros_like(w)  # [V, H]
            if need_bias:
                grad_bias = torch.zeros_like(b)  # [V]
            for start in range(0, n_tokens, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, n_tokens)
                h = hidden[start:stop].to(dtype)  # [C, H]
                g = scale[start:stop, None]  # [C, 1]
                logits = _chunk_logits(h, w, b, ctx.temperature)  # [C, V]
                # In place, one buffer: z -> e^(z - m) -> -g * e^(z - m) / total = -g * softmax,
                # then add g at the target: g * (onehot - softmax).
                shifted = logits.sub_(row_max[start:stop, None])  # [C, V]
                grad_z = shifted.exp_().mul_(-g / total[start:stop, None])  # [C, V]
                grad_z.scatter_add_(1, targets[start:stop, None], g)
                if need_hidden:
                    torch.mm(grad_z, w, out=grad_hidden[start:stop])  # [C, H]
                if need_weight:
                    grad_weight.addmm_(grad_z.T, h)  # [V, H]
                if need_bias:
                    grad_bias += grad_z.sum(dim=0)  # [V]
                del logits, shifted, grad_z  # as in forward: one [C, V] buffer alive at a time
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    bias: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) under softmax((hidden @ weight^T + bias) / temperature), never materialising [N, V].

    hidden [N, H] or [B, T, H]; weight [V, H] (the lm head); targets [N] or [B, T] int64; bias [V] or None.
    Returns float32 log-probs shaped like targets (float64 if an input is float64), differentiable wrt
    hidden, weight and bias. With `with_entropy=True` returns `(logprobs, entropy)`, the entropy of the
    same tempered distribution per token, DETACHED (no gradient flows through it: it is a metric, and
    an entropy bonus would need its own backward).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + [H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_targets = targets.reshape(-1).long()  # [N]
    logp, entropy = _ChunkedTokenLogprobs.apply(
        flat_hidden, weight, bias, flat_targets, float(temperature), chunk_size, with_entropy
    )
    logp = logp.view(targets.shape)  # [N] or [B, T]
    if with_entropy:
        return logp, entropy.view(targets.shape)
    return logp


# Config fields with which a causal LM's logits are NOT just lm_head(final hidden state); computing
# hidden @ W^T for such a model would silently give wrong log-probs. Value = the neutral setting.
_LOGIT_FEATURES: dict[str, float | None] = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping of the logits
    "logit_scale": 1.0,  # Cohere: logits multiplied by a constant
    "logits_scaling": 1.0,  # Granite: logits divided by a constant
    "output_multiplier_scale": 1.0,
    "lm_head_multiplier": 1.0,
    "dim_model_base": None,  # MiniCPM: hidden states rescaled before the head
}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside the wrappers gradus knows: DDP's `.module`, PEFT's base model. FSDP2's
    `fully_shard` changes the model's class in place and needs no unwrapping. Only for reading the
    config and finding modules to hook; every computation calls `model` itself."""
    inner = model
    while True:
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        elif hasattr(inner, "get_base_model") and hasattr(inner, "peft_config"):
            inner = inner.get_base_model()
        else:
            return inner


def check_plain_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """Return the model's output head, or raise ValueError if its logits are not `hidden @ W^T + b`."""
    inner = base_model(model)
    config = inner.config.get_text_config()
    for name, neutral in _LOGIT_FEATURES.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            raise ValueError(
                f"{type(inner).__name__} has config.{name}={value!r}: its logits are not a plain "
                "lm_head(hidden) product, which completion_logprobs computes; not supported"
            )
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # an adapter or quantised layer on the head is not W h + b
        raise ValueError(f"expected the output head to be a plain nn.Linear, got {type(head).__name__}")
    return head


def _keeps_logits_arg(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (HF's, since transformers 4.50)."""
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


class _HeadAsLogprobs:
    """Hooks that make the output head return chunked log-probs instead of [B, S, V] logits.

    The pre-hook keeps the head's input (the final hidden states) and hands the head an empty slice,
    so the full logits are never computed; the forward hook then returns, as the head's output,
    `token_logprobs` of those hidden states (stacked with the detached entropy). The result leaves the
    model as its `logits`, so it is part of the module call: wrappers that hook the model's outputs
    (FSDP2's pre-backward unshard, DDP's reducer) see the loss depend on them as with real logits.
    """

    def __init__(self, targets: torch.Tensor, seq_len: int, first: int, temperature: float,
                 chunk_size: int, with_entropy: bool) -> None:
        self.targets, self.seq_len, self.first = targets, seq_len, first
        self.temperature, self.chunk_size, self.with_entropy = temperature, chunk_size, with_entropy
        self.hidden: torch.Tensor | None = None

    def pre(self, module: torch.nn.Module, args: tuple) -> tuple:
        if not args:
            raise ValueError("the output head was called without a positional input; cannot compute log-probs")
        self.hidden = args[0]  # [B, k, H], the last k positions
        return (args[0][:, :0],) + tuple(args[1:])  # [B, 0, H]: the head computes nothing

    def post(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        offset = self.seq_len - hidden.shape[1]  # column of hidden[:, 0] in the full sequence
        predicting = hidden[:, self.first - 1 - offset : self.seq_len - 1 - offset]  # [B, L, H]
        logp, entropy = token_logprobs(
            predicting, module.weight, self.targets, temperature=self.temperature, chunk_size=self.chunk_size,
            bias=module.bias, with_entropy=True,
        ) if self.with_entropy else (token_logprobs(
            predicting, module.weight, self.targets, temperature=self.temperature, chunk_size=self.chunk_size,
            bias=module.bias), None)
        return logp[..., None] if entropy is None else torch.stack([logp, entropy], dim=-1)  # [B, L, 1 or 2]


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    with_entropy: bool = False,
    router_aux: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-probs of input_ids[:, completion_start:] given all tokens before them: [B, S - completion_start].

    input_ids and attention_mask are [B, S] (prompts left-padded so every completion starts at column
    `completion_start`; completions may be right-padded, their values there are computed and meant to
    be masked by the caller). `model` is a HF causal LM, bare or wrapped (DDP, FSDP2, PEFT): it is
    called once, with gradus' position ids, and hooks on its output head turn the last hidden states
    at positions completion_start-1 .. S-2 into log-probs in chunks (`token_logprobs`), so no
    [B, S, V] tensor exists. Float32; with `with_entropy` also returns the detached entropy, and with
    `router_aux` (mixture-of-experts models) then the router's load-balancing loss, which the model
    computes over the batch's real tokens (`output_router_logits=True`): (logp[, entropy][, aux]).
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be [B, S]")
    seq_len = input_ids.shape[1]
    if not 1 <= completion_start < seq_len:
        raise ValueError(
            f"completion_start must be in [1, {seq_len - 1}] for S={seq_len}, got {completion_start}"
        )
    head = check_plain_lm_head(model)
    hooks = _HeadAsLogprobs(input_ids[:, completion_start:], seq_len, completion_start, temperature, chunk_size,
                            with_entropy)
    keep = {"logits_to_keep": seq_len - completion_start + 1} if _keeps_logits_arg(model) else {}
    pre = head.register_forward_pre_hook(hooks.pre)
    post = head.register_forward_hook(hooks.post)
    try:
        router = {"output_router_logits": True} if router_aux else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False, **keep, **router)
    finally:
        pre.remove()
        post.remove()
    packed = out.logits if hasattr(out, "logits") else out[0]  # [B, L, 1 or 2]
    result = (packed[..., 0], packed[..., 1]) if with_entropy else (packed[..., 0],)
    if router_aux:
        aux = getattr(out, "aux_loss", None)
        if aux is None:
            raise ValueError(f"{type(base_model(model)).__name__} returned no router aux_loss: it is not a "
                             "mixture-of-experts model (set model.router_aux_coef only for one)")
        result = (*result, aux)
    return result if len(result) > 1 else result[0]
