"""Training-side mixture-of-experts glue: the routing the training forwards replay (`algo.routing_replay`),
the routing mismatch between rollout and training, and the router's load-balancing loss weight.

`algo.routing_replay` (Ma et al. 2025, "Stabilizing MoE Reinforcement Learning by Aligning Training and
Inference Routers", arXiv 2510.11370):
- none: every training forward routes with the current router (and the metrics show how often that
  differs from the rollout's routing of the same tokens);
- r3: every training forward of the policy (the update's, and the old log-prob pass) is forced to the
  experts the rollout chose for each token (`RolloutBatch.routed_experts`);
- r2: the forward that computes the old log-probs records its routing, and the update's later passes
  (other minibatches, other epochs) are forced to it. With one minibatch and one epoch the first forward
  is the old policy's own, so r2 changes nothing there.
The forced experts' gate weights always come from the current router (see `gradus.models.routing`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from gradus.config import ConfigError
from gradus.logprobs import base_model
from gradus.models import routing
from gradus.rollout import RolloutBatch


def is_moe(model: torch.nn.Module) -> bool:
    return routing.moe_layout_or_none(model) is not None


def unknown_routing(batch: RolloutBatch, model: torch.nn.Module) -> torch.Tensor:
    """[N, P+T, L, k] all -1 (nothing forced yet), for r2 to fill with the old policy's routing."""
    layout = routing.moe_layout(model)
    shape = (*batch.input_ids.shape, layout.num_layers, layout.top_k)
    return torch.full(shape, -1, dtype=torch.long, device=batch.device)


def check_moe_settings(model: torch.nn.Module, replay: str, aux_coef: float | None, engine: str) -> float:
    """ConfigError for an MoE setting the policy cannot use; returns the router aux-loss weight to train with
    (`model.router_aux_coef`, or the model config's `router_aux_loss_coef` for an MoE model, else 0)."""
    moe = is_moe(model)
    name = type(base_model(model)).__name__
    if replay != "none" and not moe:
        raise ConfigError(f"algo.routing_replay={replay} needs a mixture-of-experts policy; {name} is dense or not "
                          f"one gradus can route (supported model types: {', '.join(routing.ROUTERS)})")
    if replay == "r3" and engine != "local":
        raise ConfigError("algo.routing_replay=r3 needs the rollout's routing, which rollout.engine=local records; "
                          f"with rollout.engine={engine} use r2 or none")
    if aux_coef is not None and aux_coef > 0 and not moe:
        raise ConfigError(f"model.router_aux_coef={aux_coef}: {name} has no router (only mixture-of-experts models)")
    if aux_coef is not None:
        return float(aux_coef)
    return float(getattr(base_model(model).config, "router_aux_loss_coef", 0.0) or 0.0) if moe else 0.0


def columns(full: RolloutBatch, sub: RolloutBatch) -> slice:
    """The columns of `full`'s input that a trimmed sub-batch of its rows covers (trim cuts prompt padding
    on the left and completion padding on the right)."""
    start = full.prompt_ids.shape[1] - sub.prompt_ids.shape[1]
    return slice(start, start + sub.input_ids.shape[1])


def forced_experts(mode: str, sub: RolloutBatch, old: torch.Tensor | None, idx: torch.Tensor,
                   cols: slice) -> torch.Tensor | None:
    """The experts a training forward of `sub` (rows idx, columns cols of the batch) is forced to, or None."""
    if mode == "r3":
        return sub.routed_experts
    if mode == "r2" and old is not None:
        return old[idx, cols]
    return None


@contextmanager
def training_forward(model: torch.nn.Module, forced: torch.Tensor | None) -> Iterator[routing.RoutingCapture | None]:
    """Around one training forward: record its routing (MoE models; None for dense ones) and, when `forced`
    is given, force those experts. Leave the context before backward (see routing.capture)."""
    if not is_moe(model):
        yield None
        return
    with ExitStack() as stack:
        record = stack.enter_context(routing.capture(base_model(model)))
        if forced is not None:
            stack.enter_context(routing.replay(base_model(model), forced))
        yield record


def mismatch_metrics(trained: torch.Tensor, sub: RolloutBatch) -> dict[str, float]:
    """How often the training forward's routing differs from the rollout's, over the real tokens whose
    rollout routing is known (`RolloutBatch.routed_experts` != -1): routing/layer_mismatch_frac and
    routing/token_mismatch_frac. {} when the batch carries no rollout routing (vLLM)."""
    rollout = sub.routed_experts
    if rollout is None:
        return {}
    known = (rollout >= 0).all(dim=-1).all(dim=-1) & (sub.attention_mask > 0)  # [m, S]
    found = routing.routing_mismatch(rollout, trained, known)
    return {f"routing/{k}": float(v) for k, v in found.items()}
