"""A model being trained, as one process of the job holds it: wrapped for `run.parallel` (a mode of
`gradus.parallel.modes`), with its AdamW optimizer and learning-rate schedule, and what a checkpoint needs
of it (its weights in HF format, its optimizer state through DCP). The policy (`runtime.policy`) and PPO's
critic are both this kind of part; the trainer calls them and never asks how they are wrapped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradus.parallel.checkpoint import save_hf_full
from gradus.parallel.modes import Mode

# fills a checkpoint's folder for this model (rank 0), or None on ranks that write nothing
Writer = Callable[[Path], None]


@dataclass
class Optim:
    """What an update needs of a trained model (`gradus.train.update`)."""

    model: nn.Module  # as trained: bare, DDP-wrapped or FSDP2-sharded
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_clip: float


def lr_factor(step: int, *, warmup: int, total: int, kind: str, floor: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - (1.0 - floor) * frac
    if kind == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


def build_optim(model: nn.Module, lr: float, *, weight_decay: float, grad_clip: float, warmup: int, total: int,
                schedule: str) -> Optim:
    """AdamW over `model`'s trainable parameters (under LoRA: the adapters only), with warm-up and decay over
    `total` optimizer steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    factor = functools.partial(lr_factor, warmup=warmup, total=total, kind=schedule)
    return Optim(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), grad_clip)


class TrainedModel(Optim):
    """A model of the run with its optimizer; `model` is it as trained (wrapped by `mode`), `bare` the module
    inside."""

    def __init__(self, model: nn.Module, optim: Optim, mode: Mode) -> None:
        super().__init__(model, optim.optimizer, optim.scheduler, optim.grad_clip)
        self.mode = mode

    @property
    def bare(self) -> nn.Module:
        """The module itself (inside a replica's wrapper; a sharded model is its own module)."""
        return self.mode.bare(self.model)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of every parameter, gathered one at a time where sharded (a collective then)."""
        return self.mode.full_tensors(self.model)

    def writer(self, tokenizer: Any = None) -> Writer | None:
        """Collective under FSDP2 (the weights are gathered now, onto rank 0): a function that writes this model
        in HF format into a folder (a PEFT model: its adapter), with `tokenizer`; None on ranks that write nothing."""
        if self.mode.shards:
            full = self.mode.full_state_dict(self.model)  # {} on ranks other than 0
            if not full:
                return None
            return functools.partial(with_tokenizer, lambda folder: save_hf_full(self.model, full, folder), tokenizer)
        return hf_writer(self.bare, tokenizer)

    def optimizer_part(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(model, optimizer) as `gradus.parallel.checkpoint` saves and loads them."""
        return self.model, self.optimizer


def hf_writer(model: nn.Module, tokenizer: Any = None) -> Writer:
    """A writer of a whole (not sharded) model in HF format, with `tokenizer`."""
    return functools.partial(with_tokenizer, functools.partial(save_model, model), tokenizer)


def save_model(model: nn.Module, folder: Path) -> None:
    """HF format (safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)


def with_tokenizer(save: Callable[[Path], None], tokenizer: Any, folder: Path) -> None:
    """`save(folder)`, then the tokenizer (if any) beside it."""
    save(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
