"""Training-side mixture-of-experts glue, as one object: `MoeRouting`, the `gradus.train.passes.ForwardHook` of an
MoE policy, carries the routing the training forwards replay (`algo.routing_replay`) through a step's passes
and updates, measures the routing mismatch between rollout and training, and holds the router's
load-balancing loss weight. A dense policy has none (None),
and no MoE code runs for it.

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
from dataclasses import dataclass, field

import torch

from gradus.config import ConfigError
from gradus.logprobs import base_model
from gradus.models import routing
from gradus.rollout import RolloutBatch


def is_moe(model: torch.nn.Module) -> bool:
    return routing.moe_layout_or_none(model) is not None


@dataclass
class MoeRouting:
    """The routing side of training an MoE policy (see the module docstring).

    Per rollout batch (`start`): under r2 a tensor of the old policy's routing, [N, P+T, L, k] with -1 where
    not yet known, filled by the first forward that runs the old policy (the old log-prob pass, or the first
    epoch of the update when it has no such pass) and forced in every later update forward."""

    replay: str  # none | r2 | r3
    aux_coef: float  # weight of the router's load-balancing loss in the actor's loss
    old: torch.Tensor | None = None  # [N, P+T, L, k] r2: the old policy's routing of the batch's tokens
    known: bool = False  # r2: `old` is complete (forced from now on); else it is being recorded
    stats: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: torch.nn.Module, replay: str, aux_coef: float | None) -> MoeRouting | None:
        """None for a dense policy; else the routing of `model` with the config's settings (aux_coef None: the
        model config's `router_aux_loss_coef`). The config checks refused MoE settings on dense models."""
        if not is_moe(model):
            if replay != "none" or (aux_coef or 0) > 0:  # a model.path the config checks could not read
                name = type(base_model(model)).__name__
                raise ConfigError(f"algo.routing_replay={replay}, model.router_aux_coef={aux_coef}: {name} is dense "
                                  f"or not a model gradus can route (supported: {', '.join(routing.ROUTERS)})")
            return None
        coef = aux_coef if aux_coef is not None else float(
            getattr(base_model(model).config, "router_aux_loss_coef", 0.0) or 0.0)
        return cls(replay, float(coef))

    def start(self, batch: RolloutBatch, model: torch.nn.Module) -> None:
        """A new rollout batch: under r2, nothing of the old policy's routing is known yet; the first forward of
        the old policy (`forward(record=True)`) fills it, and `recorded` makes it forced."""
        self.known = False
        self.old = None
        if self.replay == "r2":
            layout = routing.moe_layout(model)
            self.old = torch.full((*batch.input_ids.shape, layout.num_layers, layout.top_k), -1, dtype=torch.long,
                                  device=batch.device)

    @contextmanager
    def forward(self, model: torch.nn.Module, full: RolloutBatch, sub: RolloutBatch, idx: torch.Tensor, *,
                record: bool, real: bool = True) -> Iterator[None]:
        """Around one training forward of rows `idx` of `full` (trimmed to `sub`): force the experts the replay
        mode asks for; afterwards, measure the mismatch with the rollout's routing (into `stats`) and, when
        `record` (a forward of the old policy, under r2), keep its routing as the old one. Leave the context
        before backward (see routing.capture)."""
        cols = columns(full, sub)
        forced = None
        if self.replay == "r3":
            forced = sub.routed_experts
        elif self.replay == "r2" and self.known:
            forced = self.old[idx, cols]
        with training_forward(model, forced) as captured:
            yield
        trained = captured.experts()  # [m, S, L, k]
        self.stats = mismatch_metrics(trained, sub)
        if record and real and self.old is not None and not self.known:
            self.old[idx, cols] = trained

    def recorded(self) -> None:
        """The old policy's routing is complete: force it from now on (r2)."""
        self.known = self.old is not None

    def records_first_epoch(self, epochs: int) -> bool:
        """r2 with no old log-prob pass and several epochs: the first epoch's routing is the old policy's."""
        return self.replay == "r2" and not self.known and epochs > 1


def start_batch(moe: MoeRouting | None, batch: RolloutBatch, model: torch.nn.Module) -> None:
    """`MoeRouting.start` for an MoE policy; nothing for a dense one (None)."""
    if moe is not None:
        moe.start(batch, model)


def columns(full: RolloutBatch, sub: RolloutBatch) -> slice:
    """The columns of `full`'s input that a trimmed sub-batch of its rows covers (trim cuts prompt padding
    on the left and completion padding on the right)."""
    start = full.prompt_ids.shape[1] - sub.prompt_ids.shape[1]
    return slice(start, start + sub.input_ids.shape[1])


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
