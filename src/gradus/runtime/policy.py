"""The policy runtime: one object owns the policy as this process trains it.

It holds the module wrapped for `run.parallel` (`gradus.parallel.modes`), with its LoRA adapters (PEFT) when
`model.lora_r` > 0, the reference of the KL term, the optimizer and schedule, and it gives:
- `reference()`: the module that computes the reference: under LoRA the policy itself with its adapter off
  (the base weights never change, so they are the initial policy; no second copy), else a frozen copy of
  the initial model, wrapped like the policy (FSDP2 shards it too);
- `export_weights()`: the full, plain weights, one tensor at a time (FSDP2 gathers each shard when reached;
  a LoRA adapter is merged into its base weight, `models.lora.merged_tensors`), named as the base HF model:
  what an engine's `sync` takes;
- `source()`: what a rollout engine is built from (`gradus.rollout.engine.PolicySource`);
- `writer()` and `optimizer_part()`: its weights (HF format; LoRA: the adapter) and optimizer state for a
  checkpoint.
PPO's critic is a `TrainedModel` of its own, built here beside the policy (`build_models`): a full copy of
the backbone with a value head, trained in full also under LoRA.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradus import parallel
from gradus.config import ConfigError
from gradus.logprobs import check_plain_lm_head
from gradus.models import build_critic, load_critic, lora
from gradus.rollout.engine import PolicySource, Weights
from gradus.runtime.trained import Optim, TrainedModel, Writer, build_optim, with_tokenizer

if TYPE_CHECKING:
    from gradus.algorithm import ResolvedAlgo
    from gradus.config import TrainConfig
    from gradus.parallel.modes import Mode


class PolicyRuntime(TrainedModel):
    """The policy (see the module docstring)."""

    def __init__(self, model: nn.Module, optim: Optim, mode: Mode, *, reference: nn.Module | None,
                 needs_reference: bool, plain: type[nn.Module], config: Any, model_dir: Path) -> None:
        super().__init__(model, optim, mode)
        self._reference = reference
        self.has_reference = needs_reference
        self._plain_class, self._config = plain, config
        self.model_dir = model_dir

    @property
    def reference_copy(self) -> nn.Module | None:
        """The frozen copy of the initial model the reference is computed with; None under LoRA (the policy with
        its adapter off) and without a reference."""
        return self._reference

    @property
    def adapted(self) -> bool:
        """Whether the policy trains LoRA adapters (a PEFT model) rather than its own weights."""
        return lora.is_lora(self.bare)

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The module that computes the reference policy within the block."""
        if not self.has_reference:
            raise RuntimeError("this run has no reference model (its KL coefficient is 0 and monitor_kl is off)")
        if self._reference is not None:
            yield self._reference
            return
        with self.bare.disable_adapter():  # LoRA: the base weights, which never change
            yield self.model

    def writer(self, tokenizer: Any = None) -> Writer | None:
        """As `TrainedModel.writer`; a LoRA policy writes its adapter alone (its config names the base folder)."""
        if not self.adapted:
            return super().writer(tokenizer)
        full = None
        if self.mode.shards:
            full = self.mode.full_state_dict(self.model)  # {} on ranks other than 0
            if not full:
                return None
        return functools.partial(with_tokenizer, functools.partial(lora.save_adapter, self.bare, state_dict=full),
                                 tokenizer)

    def export_weights(self) -> Weights:
        """(HF name, full tensor) of the policy as one plain model (see the module docstring)."""
        named = self.full_tensors()
        return lora.merged_tensors(self.bare, named) if self.adapted else named

    def source(self) -> PolicySource:
        device = next(self.model.parameters()).device
        return PolicySource(module=self.bare, sharded=self.mode.shards, adapted=self.adapted,
                            dtype=next(self.bare.parameters()).dtype,
                            blueprint=functools.partial(new_plain, self._plain_class, self._config, device=device),
                            model_dir=self.model_dir, export=self.export_weights)


def new_plain(plain_class: type[nn.Module], config: Any, dtype: torch.dtype, *, device: torch.device) -> nn.Module:
    """A new plain model of an architecture on `device`, frozen, parameters in `dtype` (their values are an
    engine's to fill with `sync`). Buffers keep their dtype: a rotary embedding's fp32 frequency table rounded
    to bf16 would put positions off by radians at 2k tokens. Built on the CPU's RNG, which is left as it was."""
    with torch.random.fork_rng(devices=[]):  # its random init must not move the run's RNG
        model = plain_class._from_config(copy.deepcopy(config), dtype=torch.float32)
    model.requires_grad_(False).eval()
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.to(device)


def plain_source(model: nn.Module, model_dir: Path) -> PolicySource:
    """What an engine is built from for a plain model that is not trained (`gradus eval`): the model itself,
    `model_dir` the folder it was loaded from (a LoRA adapter folder: the plain model it is based on)."""
    device = next(model.parameters()).device
    return PolicySource(module=model, sharded=False, adapted=False, dtype=next(model.parameters()).dtype,
                        blueprint=functools.partial(new_plain, type(model), model.config, device=device),
                        model_dir=lora.plain_model_dir(model_dir),
                        export=lambda: ((n, p.detach()) for n, p in model.named_parameters(remove_duplicate=False)))


def load_plain(cfg: TrainConfig, device: torch.device, *, initial_dir: Path, ckpt: Path | None) -> tuple[Any, Any]:
    """The policy as a plain HF model, and its tokenizer: from a checkpoint's full weights, or from `initial_dir`
    (a fresh run; and a LoRA run, whose checkpoint holds an adapter that `build_models` puts on it)."""
    folder = ckpt / "policy" if ckpt is not None and cfg.model.lora_r == 0 else initial_dir
    model, tokenizer = lora.load_model(folder, cfg.model.dtype, device)
    try:
        check_plain_lm_head(model)  # the log-probs' head hooks need logits = W h + b
    except ValueError as err:
        raise ConfigError(f"model.path: {err}") from err
    return model, tokenizer


@dataclass
class Models:
    """The models a run trains."""

    policy: PolicyRuntime
    critic: TrainedModel | None  # estimators with a critic (PPO's GAE)

    def train(self) -> None:
        for part in (self.policy, self.critic):
            if part is not None:
                part.train()

    def eval(self) -> None:
        for part in (self.policy, self.critic):
            if part is not None:
                part.eval()


def build_models(plain: nn.Module, cfg: TrainConfig, algo: ResolvedAlgo, device: torch.device, *,
                 initial_dir: Path, ckpt: Path | None) -> Models:
    """The policy runtime (and critic) from `plain`, the policy loaded as a plain HF model (from `initial_dir`,
    or from a checkpoint's full weights; under LoRA always the base), held as `run.parallel` says in this job.
    `ckpt`: the checkpoint resumed, whose adapter and critic are loaded here; its optimizer states are loaded
    later (`gradus.parallel.checkpoint`)."""
    mode = parallel.mode_for(cfg.run.parallel, parallel.active())
    total = algo.steps * algo.epochs * algo.minibatches  # optimizer steps in the run
    o = cfg.optim

    def optimizer(model: nn.Module, lr: float) -> Optim:
        return build_optim(model, lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip, warmup=o.warmup_steps,
                           total=total, schedule=o.schedule)

    critic = None
    if algo.uses_critic:  # full, also under LoRA; built from the plain policy, before any adapter
        module = load_critic(ckpt / "critic", device=device) if ckpt else build_critic(plain)
        wrapped = mode.wrap(module, device)
        critic = TrainedModel(wrapped, optimizer(wrapped, cfg.algo.critic_lr), mode)
    plain_class, config = type(plain), plain.config
    policy = plain
    if cfg.model.lora_r > 0:
        policy = lora.load_lora(plain, ckpt / "policy") if ckpt else lora.apply_lora(plain, cfg.model)
        parallel.broadcast_trainable(policy)  # new adapters are drawn from each rank's RNG: take rank 0's
    reference = None
    if algo.needs_reference and not lora.is_lora(policy):
        reference, _ = lora.load_model(initial_dir, cfg.model.dtype, device)
        reference = mode.wrap(reference.eval().requires_grad_(False), device, trainable=False)
    wrapped = mode.wrap(policy, device)
    runtime = PolicyRuntime(wrapped, optimizer(wrapped, cfg.optim.lr), mode, reference=reference,
                            needs_reference=algo.needs_reference, plain=plain_class, config=config,
                            model_dir=lora.plain_model_dir(initial_dir if cfg.model.lora_r > 0 or ckpt is None
                                                           else ckpt / "policy"))
    return Models(runtime, critic)


def parameter_names(part: TrainedModel) -> list[str]:
    """The names of a trained model's trainable parameters, in order (what a pre-DCP optimizer state's positions
    meant)."""
    return [name for name, p in part.bare.named_parameters() if p.requires_grad]
