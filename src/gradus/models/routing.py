"""Routing capture and Routing Replay for Hugging Face mixture-of-experts models, through hooks on their routers.

A mixture-of-experts block sends each token to the k experts its router scores highest. The rollout
engine and the trainer compute the router's logits with different kernels, so for a token near a tie
they can pick different experts; then pi_train / pi_rollout of that token compares two different
networks, and the importance ratios of GRPO-style objectives blow up (Ma et al. 2025, "Stabilizing
MoE Reinforcement Learning by Aligning Training and Inference Routers", arXiv 2510.11370):

- R2 replays, in the training forward, the experts the trainer's own forward chose for the old policy;
- R3 ("Rollout Routing Replay") replays the experts the rollout chose while sampling.

Both need two operations, which this module provides on the model's own forward (nothing here reads
a weight or re-implements a layer; hooks change what the router module returns):

- `capture(model)`: records the top-k expert indices of every token in every MoE layer, for
  full-sequence forwards and for KV-cache decoding steps alike;
- `replay(model, experts)`: every router returns the given experts instead of its own top-k.

What replay computes, per token and MoE layer, with z the router's logits (computed by the router
module itself from the current weights) and S the forced set of k experts, in the recorded order:

    p = softmax(z) in float32 over all experts           (as the router does)
    w_e = p_e for e in S                                 (gather, where the router takes its top-k)
    w_e = w_e / sum_{e' in S} p_e'  if the architecture renormalises its top-k (below)
    w cast back to z's dtype        if the architecture does so

and the experts block then mixes the outputs of the experts in S with weights w. So the experts are
forced, the weights are the current router's, and the router weight gets a gradient through w (and
through the load-balancing loss). With S equal to the router's own top-k this is exactly the
router's output (same values, same order), so replaying a capture of the same weights and inputs
reproduces the plain forward bit for bit. As in the R3 paper, only the expert choice is replayed,
never the rollout's gate weights.

Departures and limits:
1. A token may be left unforced: a row of k entries all -1 (e.g. at padding, or where nothing was
   recorded) keeps the router's own choice for that token and layer.
2. transformers' load-balancing loss (`output_router_logits=True` -> `out.aux_loss`) recomputes a
   top-k from the router logits, so under replay it counts the router's own choices, not the
   forced experts; its probability term, and so its gradient to the router, is unchanged.
3. Capture records each router call. A forward recomputed by activation checkpointing inside the
   context (during backward) is recorded again; leave the context before backward, or read the
   first forwards only. Replay forces the same experts on every call, so recomputation is consistent.
4. The registry mirrors the router code of transformers 5.24 (`<Arch>TopKRouter.forward`); a new
   architecture needs one entry, and the identity test (replay of a capture == plain forward)
   checks the entry reproduces its router exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from gradus.logprobs import base_model


@dataclass(frozen=True)
class RouterSpec:
    """How one architecture routes: which module is its router, and how the router turns its logits
    into gate weights. All registered routers take the MoE block's tokens flattened batch-major,
    [B * S, H] (row b * S + s), and return (logits [N, E], weights [N, k], indices [N, k]); the
    router's parent module is the MoE block, called with [B, S, H]."""

    router_cls: type[nn.Module]
    """Class of the router module; found with isinstance, so FSDP2's per-module subclasses match."""
    renormalises: Callable[[nn.Module], bool]
    """Whether the router divides its top-k probabilities by their sum (given the router module)."""
    weights_in_logits_dtype: bool
    """Whether the router casts the gate weights back to the logits' dtype (else they stay float32)."""


# Keyed by config.model_type. Read from transformers 5.24: Qwen2MoeTopKRouter and Qwen3MoeTopKRouter
# renormalise when config.norm_topk_prob and cast the weights to the logits' dtype; MixtralTopKRouter
# always renormalises and returns float32 weights.
ROUTERS: dict[str, RouterSpec] = {
    "qwen2_moe": RouterSpec(Qwen2MoeTopKRouter, lambda router: bool(router.norm_topk_prob), True),
    "qwen3_moe": RouterSpec(Qwen3MoeTopKRouter, lambda router: bool(router.norm_topk_prob), True),
    "mixtral": RouterSpec(MixtralTopKRouter, lambda router: True, False),
}


@dataclass(frozen=True)
class MoeLayout:
    """The MoE layers of one model, in forward order (layer l of an experts tensor = routers[l])."""

    model_type: str
    spec: RouterSpec
    names: tuple[str, ...]
    """Module names of the routers, relative to the bare HF model (e.g. "model.layers.0.mlp.gate")."""
    routers: tuple[nn.Module, ...]
    blocks: tuple[nn.Module, ...]
    """The MoE block around each router (its parent module), which sees the [B, S, H] input."""
    top_k: int
    num_experts: int

    @property
    def num_layers(self) -> int:
        return len(self.routers)


def moe_layout(model: nn.Module) -> MoeLayout:
    """Find the routers of `model` (bare or wrapped: DDP, PEFT, FSDP2); ValueError for an architecture
    not in `ROUTERS`, or a registered one without any MoE layer."""
    inner = base_model(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ROUTERS:
        raise ValueError(
            f"routing capture/replay does not support {type(inner).__name__} (model_type={model_type!r}); "
            f"supported model types: {sorted(ROUTERS)}"
        )
    spec = ROUTERS[model_type]
    found = [(name, module) for name, module in inner.named_modules() if isinstance(module, spec.router_cls)]
    if not found:
        raise ValueError(f"{type(inner).__name__} (model_type={model_type!r}) has no {spec.router_cls.__name__} "
                         "modules: no MoE layers to capture or replay")
    blocks = tuple(inner.get_submodule(name.rpartition(".")[0]) for name, _ in found)
    routers = tuple(module for _, module in found)
    top_ks = {int(r.top_k) for r in routers}
    counts = {int(r.num_experts) for r in routers}
    if len(top_ks) != 1 or len(counts) != 1:
        raise ValueError(f"MoE layers disagree on top_k {sorted(top_ks)} or num_experts {sorted(counts)}")
    return MoeLayout(model_type, spec, tuple(name for name, _ in found), routers, blocks,
                     top_ks.pop(), counts.pop())


def moe_layout_or_none(model: nn.Module) -> MoeLayout | None:
    """`moe_layout`, or None for a model this module does not route (a dense one, an unknown architecture)."""
    try:
        return moe_layout(model)
    except ValueError:
        return None


class _BlockShapes:
    """Forward pre-hooks on the MoE blocks: the (B, S) of the tokens each router is about to see."""

    def __init__(self, layout: MoeLayout) -> None:
        self.shapes: list[tuple[int, int] | None] = [None] * layout.num_layers
        self.handles = [block.register_forward_pre_hook(self._pre_hook(l)) for l, block in enumerate(layout.blocks)]

    def _pre_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            hidden = args[0]  # [B, S, H]
            self.shapes[layer] = (hidden.shape[0], hidden.shape[1])
        return hook

    def take(self, layer: int, n_tokens: int) -> tuple[int, int]:
        shape, self.shapes[layer] = self.shapes[layer], None
        if shape is None or shape[0] * shape[1] != n_tokens:
            raise RuntimeError(f"MoE layer {layer}: router saw {n_tokens} tokens but its block's input was {shape}")
        return shape

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class RoutingCapture:
    """What `capture` recorded: per MoE layer, the top-k expert indices of each router call."""

    def __init__(self, layout: MoeLayout) -> None:
        self.layout = layout
        self._calls: list[list[torch.Tensor]] = [[] for _ in range(layout.num_layers)]  # [l][c]: [B, S, k]

    def _record(self, layer: int, shape: tuple[int, int], indices: torch.Tensor) -> None:
        self._calls[layer].append(indices.detach().view(*shape, self.layout.top_k))  # [B, S, k]

    @property
    def forwards(self) -> list[torch.Tensor]:
        """One int64 tensor [B, S, L, k] per forward, in call order: the c-th call of every layer's router
        is forward c. With a KV cache, a prefill gives [B, P, L, k] and each decoding step [B, 1, L, k].
        Top-k order is the router's (descending probability). Tensors stay on the model's device."""
        counts = [len(calls) for calls in self._calls]
        if len(set(counts)) > 1:
            raise ValueError(f"the MoE layers recorded different numbers of router calls {counts} "
                             "(an interrupted forward, or one that skipped layers)")
        return [torch.stack([calls[c] for calls in self._calls], dim=2) for c in range(counts[0])]  # [B, S, L, k]

    def take(self) -> list[torch.Tensor]:
        """`forwards`, then forget them: the next call returns only forwards run after this one (for a
        decoding loop that consumes each step's routing as it comes, while rows are being dropped)."""
        forwards = self.forwards
        self._calls = [[] for _ in self._calls]
        return forwards

    def experts(self) -> torch.Tensor:
        """All forwards joined along the sequence: [B, sum S, L, k] (every forward must have the same B;
        e.g. one prefill and its decoding steps with no row dropped)."""
        forwards = self.forwards
        if not forwards:
            raise ValueError("nothing was captured")
        rows = {f.shape[0] for f in forwards}
        if len(rows) != 1:
            raise ValueError(f"the captured forwards have different batch sizes {sorted(rows)}; join them yourself")
        return torch.cat(forwards, dim=1)  # [B, sum S, L, k]


@contextmanager
def capture(model: nn.Module) -> Iterator[RoutingCapture]:
    """While active, every forward of `model` records each MoE layer's top-k expert indices per token
    (see `RoutingCapture.forwards`). Inside a `replay` context it records the forced experts, whichever
    context was entered first. Hooks only read the router's output; the forward is unchanged."""
    layout = moe_layout(model)
    record = RoutingCapture(layout)
    shapes = _BlockShapes(layout)

    def router_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            indices = output[2]  # [N, k]
            record._record(layer, shapes.take(layer, indices.shape[0]), indices)
        return hook

    handles = [router.register_forward_hook(router_hook(l)) for l, router in enumerate(layout.routers)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        shapes.remove()


def check_experts(experts: torch.Tensor, layout: MoeLayout) -> None:
    """ValueError unless experts is an integer [B, S, L, k] whose (token, layer) rows are k distinct
    experts in [0, E), or all -1 (not forced)."""
    if experts.dtype.is_floating_point or experts.dtype.is_complex or experts.dtype == torch.bool:
        raise ValueError(f"experts must be an integer tensor, got {experts.dtype}")
    if experts.dim() != 4 or experts.shape[2:] != (layout.num_layers, layout.top_k):
        raise ValueError(f"experts must be [B, S, L={layout.num_layers}, k={layout.top_k}], "
                         f"got {tuple(experts.shape)}")
    rows = experts.long().reshape(-1, layout.top_k)  # [B*S*L, k]
    free = (rows == -1).all(dim=1)  # [B*S*L]
    forced = rows[~free]  # [M, k]
    if forced.numel() and not ((forced >= 0) & (forced < layout.num_experts)).all():
        raise ValueError(f"forced experts must be in [0, {layout.num_experts}) (or a whole row of -1 for none)")
    ordered = forced.sort(dim=1).values  # [M, k]
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("a token's forced experts must be distinct")


# Routers with an active replay: a second replay on the same router would silently override the first.
_REPLAYING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@contextmanager
def replay(model: nn.Module, experts: torch.Tensor) -> Iterator[MoeLayout]:
    """While active, every router of `model` returns `experts` as its top-k instead of its own choice,
    with gate weights from its current probabilities over them (module docstring).

    experts: [B, S, L, k] integer, aligned with the tokens of each forward in the context
    (input_ids [B, S]; layer l = the l-th MoE layer in forward order); a row of k times -1 keeps the
    router's own choice for that token and layer. Every forward inside the context must have that
    [B, S] (RuntimeError otherwise); the same experts are forced on every call, so a forward recomputed
    by activation checkpointing is forced alike.
    """
    layout = moe_layout(model)
    check_experts(experts, layout)
    if any(router in _REPLAYING for router in layout.routers):
        raise RuntimeError("a replay is already active on this model; replays do not nest")
    batch, seq = experts.shape[:2]
    device = layout.routers[0].weight.device
    # a copy: the caller's tensor may change later, or be an inference tensor (captured under inference_mode)
    per_layer = experts.to(device=device, dtype=torch.long, copy=True).permute(2, 0, 1, 3)  # [L, B, S, k]
    per_layer = per_layer.reshape(layout.num_layers, batch * seq, layout.top_k)  # [L, N, k] batch-major
    free = (per_layer == -1).all(dim=-1, keepdim=True)  # [L, N, 1]
    shapes = _BlockShapes(layout)

    def router_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
            logits, _, own = output  # [N, E], [N, k], [N, k]
            shape = shapes.take(layer, logits.shape[0])
            if shape != (batch, seq):
                raise RuntimeError(f"replay was given experts for [B, S] = {[batch, seq]} tokens, "
                                   f"but MoE layer {layer} was called on {list(shape)}")
            chosen = torch.where(free[layer], own, per_layer[layer])  # [N, k]
            probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
            weights = probs.gather(1, chosen)  # [N, k]
            if layout.spec.renormalises(module):
                weights = weights / weights.sum(dim=-1, keepdim=True)  # [N, k]
            if layout.spec.weights_in_logits_dtype:
                weights = weights.to(logits.dtype)
            return logits, weights, chosen
        return hook

    # prepend: runs before any other forward hook on the router, so a capture (ours or transformers'
    # output recorder, which reads the logits) sees the replayed output whichever was registered first
    handles = [router.register_forward_hook(router_hook(l), prepend=True) for l, router in enumerate(layout.routers)]
    _REPLAYING.update(layout.routers)
    try:
        yield layout
    finally:
        for handle in handles:
            handle.remove()
        shapes.remove()
        for router in layout.routers:
            _REPLAYING.discard(router)


@torch.no_grad()
def routing_mismatch(a: torch.Tensor, b: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How often two routings of the same tokens differ, over counted tokens (0-dim float32 tensors).

    a, b: [B, S, L, k] expert indices (e.g. the rollout's and the trainer's); loss_mask: [B, S], 1 = counts.
    Sets are compared, not orders: (1, 3) and (3, 1) are the same routing.

    - layer_mismatch_frac: share of counted (token, layer) pairs whose top-k sets differ;
    - token_mismatch_frac: share of counted tokens whose sets differ in at least one layer.

    Both are 0 when nothing is counted.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must both be [B, S, L, k]")
    if loss_mask.shape != a.shape[:2]:
        raise ValueError(f"loss_mask must be [B, S] = {list(a.shape[:2])}, got {tuple(loss_mask.shape)}")
    differs = (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1)  # [B, S, L]
    mask = loss_mask.float()  # [B, S]
    tokens = mask.sum()
    pairs = (differs.float().sum(dim=-1) * mask).sum()  # counted (token, layer) pairs that differ
    tokens_differ = (differs.any(dim=-1).float() * mask).sum()
    denominator = tokens.clamp(min=1.0)
    return {
        "layer_mismatch_frac": pairs / (denominator * a.shape[2]),
        "token_mismatch_frac": tokens_differ / denominator,
    }
