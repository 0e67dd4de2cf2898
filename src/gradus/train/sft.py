"""Supervised warm start: teach a model the task's answer format before RL can reward it.

Teacher forcing on prompt + target + EOS, loss (token-mean cross-entropy) on the target tokens
only. The target is the example's worked `solution` when the task has one, else its answer. A multi-turn task
(one with a `demonstration`) gives whole episodes instead: the model's turns and the environment's answers,
laid out exactly as the episodes of a run are (`gradus.envs.render`), with the loss on the model's turns only.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradus.config import SFTConfig
from gradus.envs.render import TurnRenderer
from gradus.logprobs import completion_logprobs
from gradus.models.loading import ModelLoadError
from gradus.rollout import RolloutBatch
from gradus.tasks import Example, Task
from gradus.tasks.base import seeded_rng
from gradus.threads import governor_for
from gradus.train.data import encode_prompts

# A warm-start step takes about 0.1 s: checking the load before every fifth costs well under 1%.
_CHECK_THREADS_EVERY = 5


def sft_target(example: Example) -> str:
    return str(example.meta.get("solution") or example.answer)


def pack(prompts: list[list[int]], targets: list[list[int]], pad_id: int, device: torch.device,
         actions: list[list[int]] | None = None) -> RolloutBatch:
    """Prompt and target ids in the rollout layout: prompts left-padded, targets right-padded; `actions` (1 = a
    token the loss learns, per target token) makes the batch's `action_mask`."""
    P, T, B = max(map(len, prompts)), max(map(len, targets)), len(prompts)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)  # [B, P]
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    action_mask = None if actions is None else torch.zeros(B, T, dtype=torch.long)  # [B, T]
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = 1
        completion_ids[i, : len(t)] = torch.tensor(t)
        completion_mask[i, : len(t)] = 1
        if action_mask is not None:
            action_mask[i, : len(t)] = torch.tensor(actions[i], dtype=torch.long)
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, sampling_logp=torch.zeros(B, T),
        lengths=completion_mask.sum(-1), truncated=torch.zeros(B, dtype=torch.bool),
        prompt_index=torch.arange(B), pad_token_id=pad_id, action_mask=action_mask,
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


def demonstration_ids(task: Any, renderer: TurnRenderer, example: Example, rng: Any,
                      max_turns: int) -> tuple[list[int], list[int]]:
    """A demonstrated episode as (ids, actions): each model turn's text encoded and ended as a turn ends, each
    answer rendered as the environment's are in a run; actions 1 on the model's tokens."""
    ids: list[int] = []
    actions: list[int] = []
    for text, by_model in task.demonstration(example, rng, max_turns):
        if by_model:
            piece = renderer.tokenizer(text, add_special_tokens=False)["input_ids"] + list(renderer.end_of_turn_ids)
        else:
            piece = renderer.observation_ids(text)
        ids += piece
        actions += [int(by_model)] * len(piece)
    return ids, actions


def encode_sft_batch(task: Task, tokenizer: Any, examples: list[Example], device: torch.device,
                     max_turns: int = 1, seed: int = 0, first: int = 0) -> RolloutBatch:
    """Examples `first`, `first` + 1, ... as a batch; a multi-turn task's as demonstrated episodes of at most
    `max_turns` turns (drawn with a stream keyed by (seed, example number))."""
    prompts = encode_prompts(task, tokenizer, examples)
    if hasattr(task, "demonstration"):
        renderer = TurnRenderer(tokenizer)
        episodes = [demonstration_ids(task, renderer, ex, seeded_rng("sft", seed, first + i), max_turns)
                    for i, ex in enumerate(examples)]
        return pack(prompts.ids, [ids for ids, _ in episodes], tokenizer.pad_token_id, device,
                    actions=[a for _, a in episodes])
    eos = tokenizer.eos_token_id
    targets = [tokenizer(sft_target(ex), add_special_tokens=False)["input_ids"] + [eos] for ex in examples]
    return pack(prompts.ids, targets, tokenizer.pad_token_id, device)


def sft_loss(model: torch.nn.Module, batch: RolloutBatch, chunk_size: int = 1024) -> torch.Tensor:
    logp = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_start,
                               chunk_size=chunk_size)  # [B, T]
    mask = batch.loss_tokens.to(logp.dtype)
    return -(logp * mask).sum() / mask.sum()


def run_sft(model: torch.nn.Module, tokenizer: Any, task: Task, cfg: SFTConfig, *, seed: int = 0,
            progress: bool = True, start_index: int = 0, threads: int | None = None,
            max_turns: int = 1) -> dict[str, float]:
    """Train `model` in place for cfg.steps steps; returns the final metrics. `threads`: CPU threads
    (None: follow the machine's load, see gradus.threads); `max_turns`: a multi-turn task's episode length."""
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
            batch = encode_sft_batch(task, tokenizer, task.train_batch(first, cfg.batch_size), device,
                                     max_turns=max_turns, seed=seed, first=first)
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
