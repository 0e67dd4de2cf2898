"""The RL training loop. Each step reads as the seven steps of the method:

1-3. sample G completions for a batch of prompts and score them (DAPO: dynamic sampling)
4.   advantages: group-normalised (GRPO family) or GAE from the critic (PPO)
5.   old log-probs (skipped when the update is exactly on-policy, except for PPO's KL reward),
     reference log-probs (KL only)
6.   actor (and critic) updates with the chosen objective
7.   metrics, evaluation, checkpoint

Generation, scoring, advantages, updates and logging live in their own modules; this file wires
them together. Nothing here assumes one process: data and seeds are rank-aware and the loss
denominators are global (see update.py).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from gradus import parallel
from gradus.config import ConfigError, TrainConfig, get_key, load_config, to_dict
from gradus.config_checks import validate
from gradus.logprobs import check_plain_lm_head
from gradus.models import build_critic, load_critic, lora
from gradus.objectives import gae, group_advantages, kl_penalty, outcome_token_rewards
from gradus.parallel.checkpoint import DCP_DIR, load_sharded, save_hf_full, save_sharded
from gradus.rollout import SamplingParams
from gradus.threads import governor_for
from gradus.train import bootstrap, moe
from gradus.train.checkpoint import (
    capture_rng,
    checkpoint_dir,
    latest_checkpoint,
    load_state,
    restore_rng,
    save_checkpoint,
)
from gradus.train.data import PromptSource
from gradus.train.durable import DiskFull, replace_text
from gradus.train.engines import build_engine, check_engine, engine_problem
from gradus.train.evaluate import evaluate
from gradus.train.generation import SUMMED_OVER_RANKS, Collected, collect
from gradus.train.interrupts import Interrupted, StopSignals
from gradus.train.passes import batch_logprobs, batch_values
from gradus.train.presets import ResolvedAlgo, resolved_config
from gradus.train.runlog import NullLogger, RunLogger, read_metrics
from gradus.train.scoring import Scorer, parse_reward_specs
from gradus.train.update import NonFiniteUpdate, Optim, UpdateInputs, global_count, run_updates


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


class Trainer:
    def __init__(self, cfg: TrainConfig, *, run_dir: Path | None = None, resume: bool = False,
                 label: str | None = None):
        self.cfg = cfg
        self.label = label  # the progress bar's title; None: the algorithm's name
        self.algo = validate(cfg)
        # under torchrun: join the process group (every rank has validated the config by now)
        self.layout = parallel.setup(cfg.run.device, cfg.run.dist_timeout_s)
        try:
            self._start(cfg, run_dir, resume)
        except BaseException:
            parallel.teardown(self.layout)
            raise

    def _start(self, cfg: TrainConfig, run_dir: Path | None, resume: bool) -> None:
        self.rank, self.world = self.layout.rank, max(1, dist.get_world_size() if self.layout.distributed else 1)
        if cfg.rollout.prompts_per_step % self.world:
            raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the "
                              f"{self.world} processes: it is the global batch, split evenly over the ranks")
        if self.layout.distributed and cfg.model.lora_r > 0 and cfg.run.parallel == "fsdp2":
            raise ConfigError("model.lora_r > 0 with run.parallel=fsdp2: LoRA runs under torchrun with "
                              "run.parallel=ddp (the adapters are small: sharding them saves little)")
        if problem := engine_problem(cfg, self.layout.distributed):
            raise ConfigError(problem)
        device, self.task = bootstrap.preflight(cfg)  # before any warm start
        self.device = parallel.rank_device(device, self.layout)
        check_engine(cfg, self.device)  # vLLM installed and importable, before the warm start or a run folder
        specs = parse_reward_specs(cfg.task.rewards, self.task)
        try:
            self.scorer = Scorer(self.task, specs, timeout_s=cfg.task.reward_timeout_s,
                                 strict=cfg.task.strict_rewards)
        except ValueError as err:
            raise ConfigError(f"task.rewards: {err}") from err
        # CPU threads that follow the load; the reward workers' CPU time is this run's own work
        self.governor = governor_for(cfg.run.threads, self.device, helpers=self.scorer.reward.pool.pids)
        try:
            self._build(cfg, run_dir, resume)
        except BaseException:
            self.scorer.close()  # the reward workers must not outlive a trainer that never ran
            if getattr(self, "engine", None) is not None:
                self.engine.close()  # nor a vLLM engine
            raise

    def _build(self, cfg: TrainConfig, run_dir: Path | None, resume: bool) -> None:
        """Run folder, models, optimizers and state (fresh, or from the newest complete checkpoint)."""

        # one folder for the job: rank 0's clock names it (ranks start seconds apart, machines' clocks differ)
        self.run_dir = Path(run_dir) if run_dir else parallel.from_rank0(_new_run_dir(cfg, self.algo))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if resume and ckpt is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
        if ckpt and self.layout.distributed and cfg.run.parallel == "fsdp2" and not (ckpt / DCP_DIR).is_dir():
            raise ConfigError(f"--resume: {ckpt} was written by a single process; resume it with run.parallel=ddp "
                              "or in one process (its optimizer state is not sharded for FSDP2)")
        state = load_state(ckpt) if ckpt else {}
        self._saved = (state["step"], ckpt) if ckpt else None  # (step, folder) of this history's newest save

        torch.manual_seed(cfg.run.seed * 1009 + self.rank)
        self.initial_dir = Path(state.get("initial_model_dir") or self._initial_dir())
        use_lora = cfg.model.lora_r > 0  # a checkpoint's policy/ is then an adapter on initial_dir
        policy, self.tokenizer = bootstrap.load_model(
            ckpt / "policy" if ckpt and not use_lora else self.initial_dir, cfg, self.device)
        try:
            check_plain_lm_head(policy)  # the log-probs' head hooks need logits = W h + b
        except ValueError as err:
            raise ConfigError(f"model.path: {err}") from err
        bootstrap.check_prompt_lengths(self.task, self.tokenizer, policy, cfg)  # may drop rows of a file
        # MoE: routing replay and the router's load-balancing loss need a model with routers gradus knows
        self.router_aux_coef = moe.check_moe_settings(policy, self.algo.routing_replay, cfg.model.router_aux_coef,
                                                      cfg.rollout.engine)
        self.heldout = bootstrap.heldout_set(self.task, cfg.task.heldout_size)
        self.critic = None
        if self.algo.uses_critic:  # full, also under LoRA; built from the plain policy, before any adapter
            self.critic = (load_critic(ckpt / "critic", device=self.device) if ckpt
                           else build_critic(policy))
        if use_lora:
            policy = lora.load_lora(policy, ckpt / "policy") if ckpt else lora.apply_lora(policy, cfg.model)
        # The reference of the KL term: the initial policy. Under LoRA that is the policy itself with its
        # adapter off (`lora.reference_mode`), not a second copy; else a frozen copy of the initial model.
        self.reference = None
        if self.algo.needs_reference and not use_lora:
            self.reference, _ = bootstrap.load_model(self.initial_dir, cfg, self.device)
            self.reference.eval().requires_grad_(False)
        # Data parallel: DDP replicas sample with the bare module (the same tensors); FSDP2 shards the
        # weights, and rollout.dtype asks for another precision, so then sampling uses a full copy that is
        # refreshed after every update (sync_rollout_weights).
        fsdp2 = self.layout.distributed and cfg.run.parallel == "fsdp2"
        sampling_dtype = bootstrap.DTYPES[cfg.rollout.dtype or cfg.model.dtype]
        copied = fsdp2 or sampling_dtype != bootstrap.DTYPES[cfg.model.dtype]
        self.rollout_model = _sampling_copy(policy, sampling_dtype) if copied else None
        self.policy = parallel.wrap(policy, cfg.run.parallel, self.device)
        if self.reference is not None:
            self.reference = parallel.wrap(self.reference, cfg.run.parallel, self.device, trainable=False)
        elif self.algo.needs_reference:
            self.reference = self.policy  # LoRA: the same (wrapped) model, its adapter disabled when used
        if self.critic is not None:
            self.critic = parallel.wrap(self.critic, cfg.run.parallel, self.device)
        sampler = self.rollout_model if copied else parallel.unwrap_ddp(self.policy)
        # vLLM starts from the folder the policy was loaded from, then gets the live weights in memory
        self.engine = build_engine(cfg, sampler, self.tokenizer, ckpt / "policy" if ckpt else self.initial_dir,
                                   self.device)
        if self.engine.owns_weights:
            self.sync_rollout_weights()
        self.params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                     top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)
        self.actor_opt = _optim(self.policy, cfg.optim.lr, cfg, self.algo)
        self.critic_opt = _optim(self.critic, cfg.algo.critic_lr, cfg, self.algo) if self.critic is not None else None
        self.source = PromptSource(self.task, self.tokenizer, rank=self.rank, world=self.world,
                                   position=_data_position(state, self.rank, self.world))
        self.step = state.get("step", 0)
        self.bad_streak = state.get("bad_streak", 0)
        self.elapsed = state.get("elapsed", 0.0)
        self.eval_before = state.get("eval_before")
        if ckpt:
            self._restore(ckpt, state)
        if self.rank == 0:
            _save_config_atomically(resolved_config(cfg, self.algo), self.run_dir / "config.yaml")

    def _initial_dir(self) -> Path:
        """The model a fresh run starts from; a warm start of the built-in model is made by rank 0 alone,
        the other ranks wait for it and then read it from the cache."""
        progress = self.cfg.run.progress and self.rank == 0
        if self.rank == 0:
            path = bootstrap.initial_model_dir(self.cfg, progress=progress)
        parallel.barrier()
        return path if self.rank == 0 else bootstrap.initial_model_dir(self.cfg, progress=False)

    def _restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        """Optimizer, scheduler and RNG state of a checkpoint (the weights are loaded already)."""
        self.actor_opt.scheduler.load_state_dict(state["actor_scheduler"])
        if self.critic_opt is not None:
            self.critic_opt.scheduler.load_state_dict(state["critic_scheduler"])
        if (ckpt / DCP_DIR).is_dir():  # written by a data-parallel run
            rng = load_sharded(ckpt, self._sharded_parts())
            restore_rng(rng if rng is not None else state["rng"])
            return
        self.actor_opt.optimizer.load_state_dict(state["actor_optimizer"])
        if self.critic_opt is not None:
            self.critic_opt.optimizer.load_state_dict(state["critic_optimizer"])
        restore_rng(state["rng"])

    def _sharded_parts(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        parts = {"actor": (self.policy, self.actor_opt.optimizer)}
        if self.critic_opt is not None:
            parts["critic"] = (self.critic, self.critic_opt.optimizer)
        return parts

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train to run.steps, evaluate, save, summarise. On a first SIGINT/SIGTERM: finish the step in
        progress, save it, raise Interrupted; on a second: raise KeyboardInterrupt, saving nothing."""
        try:
            return self._fit()
        except Exception as err:
            failure = parallel.collective_failure(err, self.layout, self.cfg.run.dist_timeout_s)
            if failure is not None:
                raise failure from err
            raise
        finally:
            self.scorer.close()  # the reward workers (a later evaluate or fit starts new ones)
            self.engine.close()  # vLLM: its KV cache and process-wide state
            self.governor.restore()  # the next run in this process starts from the machine's thread count
            parallel.teardown(self.layout)

    def _fit(self) -> RunResult:
        cfg = self.cfg
        log = NullLogger() if self.rank != 0 else RunLogger(
            self.run_dir, total_steps=self.algo.steps, start_step=self.step, fresh=self.eval_before is None,
            progress=cfg.run.progress, desc=self.label or self.algo.name)
        try:
            with StopSignals() as stop:
                if self.eval_before is None:
                    self.eval_before = self.evaluate()
                    log.log(0, {f"eval/{k}": v for k, v in self.eval_before.items()})
                while self.step < self.algo.steps and not parallel.any_rank(stop.requested, self.device):
                    self._step(log)
                if parallel.any_rank(stop.requested, self.device):
                    ckpt = self.save()
                    message = f"stopped by {stop.name} after step {self.step}, saved in {ckpt}"
                    log.write(message)
                    raise Interrupted(message, signum=stop.signum, step=self.step, run_dir=self.run_dir)
                # a signal from here on lets the run finish: all that is left is the final evaluation
                final = self.evaluate()
                log.log(self.step, {f"eval/{k}": v for k, v in final.items()})
                self.save()
                summary = self.write_summary(final) if self.rank == 0 else {}
        except Interrupted:
            raise
        except KeyboardInterrupt:
            log.write(f"aborted after step {self.step}: the work in progress is not saved; a resume starts "
                      f"from the newest checkpoint in {self.run_dir / 'checkpoints'}")
            raise
        except DiskFull as err:
            err.run_dir = self.run_dir
            raise
        finally:
            log.close()
        return RunResult(self.run_dir, summary)

    def _step(self, log: RunLogger) -> None:
        """One training step, its metrics line, and the periodic evaluation and checkpoint."""
        cfg = self.cfg
        start = time.perf_counter()
        metrics = self.train_step(self.step + 1)
        self.step += 1
        self.elapsed += time.perf_counter() - start
        metrics["time/step_seconds"] = time.perf_counter() - start
        metrics["time/elapsed"] = self.elapsed
        metrics = parallel.combine_over_ranks(metrics, summed=SUMMED_OVER_RANKS)
        if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 and self.step < self.algo.steps:
            metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
        log.log(self.step, metrics)
        log.advance()
        if cfg.run.save_every and self.step % cfg.run.save_every == 0:
            self.save()

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        threads = self.governor.pick()
        # 1-3: sample and score (dynamic sampling inside)
        self.policy.eval()
        got = collect(self.engine, self.source, self.scorer, self.tokenizer, self.params, self.algo,
                      num_groups=cfg.rollout.prompts_per_step // self.world, group_size=cfg.rollout.group_size,
                      seed=_mix(cfg.run.seed, step))
        self.engine.sleep()  # GPU vLLM: its KV cache is freed for the update; sync_rollout_weights wakes it
        metrics = dict(got.metrics, **{"time/threads": float(threads)})
        # every rank must take the same number of optimizer steps (they all-reduce gradients), so the
        # smallest batch over ranks sets the minibatch count, and if one rank has none, none trains
        smallest = parallel.global_min(got.batch.batch_size if got.batch is not None else 0, self.device)
        if smallest == 0:
            self.engine.wake_up()
            metrics["actor/skipped_updates"] = 0.0
            metrics["actor/updates"] = 0.0
            return metrics
        minibatches = self._minibatches(smallest)
        inputs = self.prepare(got, metrics, minibatches)  # 4-5
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        gen = torch.Generator().manual_seed(_mix(cfg.run.seed, step, self.rank, 7))
        update_metrics, skipped = run_updates(
            inputs, self.actor_opt, self.algo, epochs=self.algo.epochs, minibatches=minibatches,
            token_budget=cfg.optim.token_budget, temperature=cfg.rollout.temperature,
            chunk_size=cfg.model.chunk_size, generator=gen, critic=self.critic_opt,
            value_clip=cfg.algo.value_clip, router_aux_coef=self.router_aux_coef,
            train_actor=not (self.algo.uses_critic and step <= cfg.algo.critic_warmup))
        metrics.update(update_metrics)
        start = time.perf_counter()
        self.sync_rollout_weights()
        if self.engine.owns_weights:
            metrics["rollout/weight_sync_seconds"] = time.perf_counter() - start
        self._check_finite(skipped, int(update_metrics["actor/updates"]) + skipped)
        return metrics

    def sync_rollout_weights(self) -> None:
        """After an update: FSDP2 refreshes the full copy the engine samples from with the (sharded) weights;
        an engine with weights of its own (vLLM) wakes up and gets the policy's weights in memory."""
        if self.rollout_model is not None:
            with torch.no_grad():
                parallel.copy_full_weights(parallel.unwrap_ddp(self.policy), self.rollout_model)
        if self.engine.owns_weights:
            self.engine.wake_up()
            self.engine.load_weights(parallel.unwrap_ddp(self.policy).state_dict())

    def prepare(self, got: Collected, metrics: dict[str, float], minibatches: int | None = None) -> UpdateInputs:
        """Steps 4-5: advantages, and the log-probs / values the update needs for `minibatches` per epoch
        (None: as many as this batch allows)."""
        cfg, algo, batch = self.cfg, self.algo, got.batch
        loss_mask = batch.completion_mask.float()  # [N, T]
        if algo.overlong_filter:
            loss_mask = loss_mask * (~batch.truncated).float()[:, None]
        passes = {"token_budget": cfg.optim.token_budget, "temperature": cfg.rollout.temperature,
                  "chunk_size": cfg.model.chunk_size}
        # One minibatch: the update's first pass runs before any optimizer step, so it gives the old
        # log-probs itself (run_updates keeps them for later epochs); no separate pass is needed.
        first_pass_is_old = (minibatches or self._minibatches(batch.batch_size)) == 1
        # MoE r2: the old log-prob pass records its routing, which the update's forwards then replay
        routes = moe.unknown_routing(batch, self.policy) if algo.routing_replay == "r2" and not first_pass_is_old \
            else None
        old_logp = None if first_pass_is_old else batch_logprobs(self.policy, batch, **passes, routes=routes,
                                                                 routing_replay=algo.routing_replay)
        ref_logp = None
        if self.reference is not None:
            with lora.reference_mode(parallel.unwrap_ddp(self.reference)):  # LoRA: the adapter off; else a no-op
                ref_logp = batch_logprobs(self.reference, batch, **passes)
        rewards = got.rewards.to(self.device)
        if not algo.uses_critic:
            advantages = group_advantages(rewards, cfg.rollout.group_size, scale=algo.adv_scale,
                                          total=global_count)  # [N]
            metrics["adv/abs_mean"] = advantages.abs().mean().item()
            return UpdateInputs(batch, loss_mask, advantages, old_logp, ref_logp, old_routing=routes)
        # PPO: per-token KL penalty in the reward, GAE from the critic's values. The penalty needs log pi_old
        # before the advantages, so before the update: a no-grad pass even with one minibatch (the update's
        # first forward cannot serve, its loss needs these advantages). With kl_coef 0 (algo.monitor_kl) the
        # KL is only a metric, which the update measures on its own forwards, as for every algorithm.
        values = batch_values(self.critic, batch, token_budget=cfg.optim.token_budget)  # [N, T]
        kl = None
        if ref_logp is not None and algo.kl_coef != 0.0:
            old = old_logp if old_logp is not None else batch_logprobs(
                self.policy, batch, **passes, routing_replay=algo.routing_replay)  # [N, T]
            kl = kl_penalty(old, ref_logp, algo.kl_estimator)  # [N, T]
        token_rewards = outcome_token_rewards(rewards, loss_mask, kl, algo.kl_coef)  # [N, T]
        advantages, returns = gae(token_rewards, values, loss_mask, gamma=cfg.algo.gamma, lam=cfg.algo.lam,
                                  total=global_count)  # whitened over the batch of every rank
        metrics["critic/value_mean_rollout"] = (values * loss_mask).sum().item() / loss_mask.sum().clamp(min=1).item()
        if kl is not None:
            metrics["actor/kl_ref_reward"] = (kl * loss_mask).sum().item() / loss_mask.sum().clamp(min=1).item()
        # a KL in the reward is not also a term of the loss; a monitored one goes to the update to be measured
        monitored = ref_logp if algo.kl_coef == 0.0 else None
        return UpdateInputs(batch, loss_mask, advantages, old_logp, monitored, old_values=values, returns=returns,
                            old_routing=routes)

    # ---- evaluation, checkpoints, summary -------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy; under torchrun each rank takes every world-th problem, and the
        counts are summed over ranks."""
        self.governor.pick()
        self.policy.eval()
        mine = self.heldout[self.rank :: self.world]
        got = evaluate(self.engine, self.tokenizer, self.task, mine,
                       max_new_tokens=self.cfg.rollout.max_new_tokens, verify=self.scorer.verify)
        right, n = parallel.sum_over_ranks([got["accuracy"] * got["n"], got["n"]], self.device)
        return {**got, "accuracy": round(right) / max(n, 1), "n": int(n)}

    def save(self) -> Path | None:
        """Checkpoint the current step. A step this run already saved, or resumed from, is not written
        again: a step's state is fully determined, and rewriting it would only risk the copy. Under
        torchrun every rank takes part (sharded optimizer states, gathered weights) and rank 0 writes the
        checkpoint; the other ranks get None."""
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        positions = parallel.gather_ints(self.source.position)  # every rank's (DAPO's rounds differ by rank)
        state = {"data_position": positions[0], "data_positions": positions,
                 "bad_streak": self.bad_streak, "elapsed": self.elapsed,
                 "initial_model_dir": str(self.initial_dir), "eval_before": self.eval_before,
                 "actor_scheduler": self.actor_opt.scheduler.state_dict()}
        if self.critic_opt is not None:
            state["critic_scheduler"] = self.critic_opt.scheduler.state_dict()
        models, writers = {}, {}
        if self.layout.distributed:
            root = checkpoint_dir(self.run_dir)
            staging = save_sharded(root, self.step, self._sharded_parts(), capture_rng())
            writers["dcp"] = functools.partial(os.replace, staging)
            for name, model, tokenizer in (("policy", self.policy, self.tokenizer), ("critic", self.critic, None)):
                if model is None:
                    continue
                if not parallel.is_sharded(model):  # DDP: every rank holds the whole model; rank 0 saves it
                    models[name] = (parallel.unwrap_ddp(model), tokenizer)
                elif full := parallel.full_state_dict(model):  # FSDP2: gathered on rank 0
                    save = functools.partial(save_hf_full, model, full)
                    writers[name] = _then(save, tokenizer.save_pretrained) if tokenizer is not None else save
        else:
            models["policy"] = (self.policy, self.tokenizer)
            state["actor_optimizer"] = self.actor_opt.optimizer.state_dict()
            if self.critic is not None:
                models["critic"] = (self.critic, None)
                state["critic_optimizer"] = self.critic_opt.optimizer.state_dict()
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.run_dir, self.step, models=models, state=state,
                                   keep=self.cfg.run.keep_checkpoints, writers=writers)
        parallel.barrier()
        self._saved = (self.step, path)
        return path

    def write_summary(self, final: dict[str, float]) -> dict[str, Any]:
        records = read_metrics(self.run_dir / "metrics.jsonl")
        rewards = [r["reward/mean"] for r in records if isinstance(r.get("reward/mean"), int | float)]
        tail = rewards[-10:]
        summary = {
            "algo": self.algo.name,
            "task": self.cfg.task.name,
            "steps": self.step,
            "wall_time_s": round(self.elapsed, 2),
            "heldout_accuracy_before": self.eval_before["accuracy"],
            "heldout_accuracy_after": final["accuracy"],
            "heldout_n": final["n"],
            "final_reward": sum(tail) / len(tail) if tail else None,
            "run_dir": str(self.run_dir),
        }
        replace_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        from gradus.train.plots import plot_run  # matplotlib costs ~25 MiB: only imported when a run ends

        plot_run(records, self.run_dir / "curves.png", title=f"{self.algo.name} on {self.cfg.task.name}")
        return summary

    # ---- helpers ----------------------------------------------------------------------------------
    def _minibatches(self, batch_size: int) -> int:
        """Configured minibatches, fewer when dynamic sampling came back short (never an empty one)."""
        return max(1, min(self.algo.minibatches, batch_size // self.cfg.rollout.group_size))

    def _check_finite(self, skipped: int, total: int) -> None:
        self.bad_streak = self.bad_streak + 1 if total and skipped == total else 0
        if self.bad_streak >= self.cfg.optim.max_bad_steps:
            raise NonFiniteUpdate(
                f"{self.bad_streak} steps in a row had only NaN/inf losses or gradients; stopping. "
                "Try a lower optim.lr, optim.grad_clip, or model.dtype=float32.")


def train(cfg: TrainConfig, *, run_dir: Path | None = None, resume: bool = False) -> RunResult:
    return Trainer(cfg, run_dir=run_dir, resume=resume).fit()


# What a run is: changing one of these on --resume would continue another run's checkpoint.
FIXED_ON_RESUME = ("algo.name", "model.path", "task.name", "task.data_file", "run.seed", "run.out_dir", "run.name",
                   "model.lora_r", "model.lora_alpha", "model.lora_dropout", "model.lora_targets")


def resume_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The saved config of a run, with `overrides` (e.g. a larger run.steps). Overrides that would change
    what the run is (FIXED_ON_RESUME) are refused."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist (is {run_dir} a gradus run folder?)")
    saved, cfg = load_config(path), load_config(path, overrides)
    changed = [f"{key} (saved {get_key(saved, key)!r}, given {get_key(cfg, key)!r})" for key in FIXED_ON_RESUME
               if _comparable(key, get_key(saved, key)) != _comparable(key, get_key(cfg, key))]
    if changed:
        raise ConfigError(f"--resume: {'; '.join(changed)} cannot change when a run is resumed; start a new run "
                          "for that (only keys such as run.steps, run.device or optim.lr may change)")
    validate(cfg)
    return cfg


def _comparable(key: str, value: Any) -> Any:
    """Paths compare as absolute paths (a relative and an absolute spelling of one folder are equal)."""
    if value is not None and key in ("model.path", "task.data_file", "run.out_dir"):
        return Path(value).expanduser().resolve()
    return value


def _save_config_atomically(cfg: TrainConfig, path: Path) -> None:
    """config.yaml is what --resume reads: a kill while writing it must leave the old one."""
    replace_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False), what="config.yaml")


def _optim(model: torch.nn.Module, lr: float, cfg: TrainConfig, algo: ResolvedAlgo) -> Optim:
    trainable = [p for p in model.parameters() if p.requires_grad]  # under LoRA: the adapters only
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.optim.weight_decay, betas=(0.9, 0.99))
    total = algo.steps * algo.epochs * algo.minibatches  # optimizer steps in the run
    factor = functools.partial(lr_factor, warmup=cfg.optim.warmup_steps, total=total, kind=cfg.optim.schedule)
    return Optim(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), cfg.optim.grad_clip)


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


def _data_position(state: dict[str, Any], rank: int, world: int) -> int:
    """This rank's position in the training stream on resume: its own on the same world size; on another
    one, every rank continues after the furthest example any rank had used (none is used twice)."""
    positions = state.get("data_positions") or [state.get("data_position", 0)]
    if len(positions) == world:
        return positions[rank]
    used = max((p - 1) * len(positions) + r + 1 if p else 0 for r, p in enumerate(positions))  # examples used
    return -(-used // world)  # ceil: the first global index this rank takes is >= used


def _sampling_copy(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of the policy to sample with, its parameters in `dtype`. Buffers keep their dtype: a
    rotary embedding's fp32 frequency table rounded to bf16 would put positions off by radians at 2k tokens."""
    sampler = copy.deepcopy(policy).requires_grad_(False)
    for param in sampler.parameters():
        param.data = param.data.to(dtype)
    return sampler


def _then(first: Any, second: Any) -> Any:
    """A writer that runs `first(folder)` then `second(folder)`."""
    def both(folder: Path) -> None:
        first(folder)
        second(folder)

    return both


def _mix(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (the same in every process and on resume)."""
    h = 0x9E3779B1
    for p in parts:
        h = (h * 0x01000193 ^ (p & 0xFFFFFFFF)) & 0x7FFFFFFF
    return h


def _new_run_dir(cfg: TrainConfig, algo: ResolvedAlgo) -> Path:
    name = cfg.run.name or f"{algo.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.out_dir) / name


__all__ = ["RunResult", "Trainer", "resume_config", "train", "validate"]
