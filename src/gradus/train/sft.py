"""Supervised warm start: teach a model the task's answer format before RL can reward it.

Teacher forcing on prompt + target + EOS, loss (token-mean cross-entropy) on the target tokens
only. The target is the example's worked `solution` when the task has one, else its answer.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradus.config import SFTConfig
from gradus.logprobs import completion_logprobs
from gradus.models.loading import ModelLoadError
from gradus.rollout import RolloutBatch
from gradus.tasks import Example, Task
from gradus.threads import governor_for
from gradus.train.data import encode_prompts

# A warm-start step takes about 0.1 s: checking the load before every fifth costs well under 1%.
_CHECK_THREADS_EVERY = 5


def sft_target(example: Example) -> str:
    return str(example.meta.get("solution") or example.answer)


def pack(prompts: list[list[int]], targets: list[list[int]], pad_id: int, device: torch.device) -> RolloutBatch:
    """Prompt and target ids in the rollout layout: prompts left-padded, targets right-padded."""
    P, T, B = max(map(len, prompts)), max(map(len, targets)), len(prompts)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)  # [B, P]
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = 1
        completion_ids[i, : len(t)] = torch.tensor(t)
        completion_mask[i, : len(t)] = 1
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, sampling_logp=torch.zeros(B, T),
        lengths=completion_mask.sum(-1), truncated=torch.zeros(B, dtype=torch.bool),
        prompt_index=torch.arange(B), pad_token_id=pad_id,
    ).to(device)


def check_eos(model: torch.nn.Module, tokenizer: Any) -> None:
    """Raise `ModelLoadError`, naming the tokenizer's folder, unless the tokenizer has an EOS id the model can
    emit: every target ends with it, which is how the warm start teaches the model to stop."""
    vocab = model.get_input_embeddings().num_embeddings
    eos = tokenizer.eos_token_id
    if isinstance(eos, int) and 0 <= eos < vocab:
        return
    folder = getattr(tokenizer, "name_or_path", "")
    where = f"{folder}: the tokenizer" if folder else "the tokenizer"
    config = Path(folder) / "tokenizer_config.json" if folder else "its tokenizer_config.json"
    raise ModelLoadError(
        f"{where} has no EOS token the model can emit (eos_token={tokenizer.eos_token!r}, the model has {vocab} "
        f'token ids), and SFT ends every target with it to teach the model to stop: set "eos_token" in {config}')


def encode_sft_batch(task: Task, tokenizer: Any, examples: list[Example], device: torch.device) -> RolloutBatch:
    prompts = encode_prompts(task, tokenizer, examples)
    eos = tokenizer.eos_token_id
    targets = [tokenizer(sft_target(ex), add_special_tokens=False)["input_ids"] + [eos] for ex in examples]
    return pack(prompts.ids, targets, tokenizer.pad_token_id, device)


def sft_loss(model: torch.nn.Module, batch: RolloutBatch, chunk_size: int = 1024) -> torch.Tensor:
    logp = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_start,
                               chunk_size=chunk_size)  # [B, T]
    mask = batch.completion_mask.to(logp.dtype)
    return -(logp * mask).sum() / mask.sum()


def run_sft(model: torch.nn.Module, tokenizer: Any, task: Task, cfg: SFTConfig, *, seed: int = 0,
            progress: bool = True, start_index: int = 0, threads: int | None = None) -> dict[str, float]:
    """Train `model` in place for cfg.steps steps; returns the final metrics. `threads`: CPU threads
    (None: follow the machine's load, see gradus.threads)."""
    check_eos(model, tokenizer)
    device = next(model.parameters()).device
    governor = governor_for(threads, device)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    bar = tqdm(range(cfg.steps), desc="sft", disable=not progress, dynamic_ncols=True)
    start, loss_ema = time.perf_counter(), None
    try:
        for step in bar:
            if step % _CHECK_THREADS_EVERY == 0:
                governor.pick()
            first = start_index + step * cfg.batch_size
            batch = encode_sft_batch(task, tokenizer, task.train_batch(first, cfg.batch_size), device)
            loss = sft_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    finally:
        governor.restore()  # the next phase starts from the machine's thread count
    bar.close()
    return {"sft/loss": float(loss_ema or 0.0), "sft/seconds": time.perf_counter() - start,
            "sft/examples": float(cfg.steps * cfg.batch_size)}
