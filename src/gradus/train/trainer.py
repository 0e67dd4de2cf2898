"""The RL training loop. A step is its named stages (`gradus.train.stages`), each timed into the metrics:

    rollout -> score -> old_logprobs -> ref_logprobs -> advantages -> update -> sync -> log

1-3. sample G completions for a batch of prompts and score them (DAPO: dynamic sampling)
4.   old log-probs (skipped when the update is exactly on-policy), reference log-probs (KL only)
5.   advantages, by the algorithm's estimator (`gradus.objectives.estimators`: group, GAE from a critic, ...)
6.   actor (and critic) updates with the chosen objective
7.   the engine's copy of the weights refreshed, when it holds one; metrics, evaluation, checkpoint

The parts do the rest: the policy runtime (`gradus.runtime`) holds the model as `run.parallel` wraps it, LoRA,
the reference and the optimizer; the engine (`gradus.rollout.registry`) samples; `MoeRouting` carries an MoE
policy's routing replay. Nothing here asks which engine, which parallel mode or whether LoRA is on, and
nothing assumes one process: data and seeds are rank-aware and the loss denominators are global.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradus import parallel
from gradus.algorithm import resolved_config
from gradus.config import TrainConfig
from gradus.config_checks import validate
from gradus.objectives import AdvantageInputs, AdvantageSettings, estimate, kl_penalty, rejection_mask
from gradus.parallel import any_rank
from gradus.rollout import SamplingParams
from gradus.rollout.registry import engine_class
from gradus.runtime import build_models, load_plain
from gradus.threads import governor_for
from gradus.train import bootstrap
from gradus.train.checkpointing import Checkpointer
from gradus.train.data import PromptSource
from gradus.train.durable import DiskFull
from gradus.train.generation import SUMMED_OVER_RANKS, Collected, collect
from gradus.train.interrupts import Interrupted, StopSignals
from gradus.train.moe import MoeRouting, start_batch
from gradus.train.passes import Passes, batch_logprobs, batch_values
from gradus.train.resume import save_config_atomically
from gradus.train.rollouts import make_rollout
from gradus.train.runlog import NullLogger, RunLogger, write_summary
from gradus.train.stages import StageTimer
from gradus.train.tally import Tally
from gradus.train.update import UpdateInputs, global_count, run_updates


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


class Trainer:
    def __init__(self, cfg: TrainConfig, *, run_dir: Path | None = None, resume: bool = False,
                 label: str | None = None):
        self.cfg = cfg
        self.label = label  # the progress bar's title; None: the algorithm's name
        self.algo = validate(cfg, world=parallel.planned_world())
        # under torchrun: join the process group (every rank has validated the config by now)
        self.layout = parallel.setup(cfg.run.device, cfg.run.dist_timeout_s)
        self.engine = None
        try:
            self._start(run_dir, resume)
        except BaseException:
            parallel.teardown(self.layout)
            raise

    def _start(self, run_dir: Path | None, resume: bool) -> None:
        cfg = self.cfg
        self.rank, self.world = self.layout.rank, parallel.planned_world()
        device, self.task = bootstrap.preflight(cfg)  # before any warm start
        self.device = parallel.rank_device(device, self.layout)
        self.rollout = make_rollout(cfg, self.task)  # its reward or environment workers start here
        # CPU threads that follow the load; the reward and environment workers' CPU time is this run's own work
        self.governor = governor_for(cfg.run.threads, self.device, helpers=self.rollout.pids)
        try:
            self._build(run_dir, resume)
        except BaseException:
            self.rollout.close()  # the workers must not outlive a trainer that never ran
            if self.engine is not None:
                self.engine.close()  # nor a vLLM engine
            raise

    def _build(self, run_dir: Path | None, resume: bool) -> None:
        """Run folder, models, engine and state (fresh, or from the newest complete checkpoint)."""
        cfg = self.cfg
        self.checkpoints = Checkpointer(self, run_dir, resume)  # the run folder, and the checkpoint resumed
        ckpt, state = self.checkpoints.resumed, self.checkpoints.state
        self.run_dir = self.checkpoints.run_dir
        torch.manual_seed(cfg.run.seed * 1009 + self.rank)
        self.initial_dir = Path(state.get("initial_model_dir") or self._initial_dir())
        plain, self.tokenizer = load_plain(cfg, self.device, initial_dir=self.initial_dir, ckpt=ckpt)
        bootstrap.check_prompt_lengths(self.task, self.tokenizer, plain, cfg)  # may drop rows of a file
        self.rollout.bind(self.tokenizer, plain)
        self.moe = MoeRouting.for_model(plain, cfg.algo.routing_replay, cfg.model.router_aux_coef)
        self.heldout = bootstrap.heldout_set(self.task, cfg.task.heldout_size)
        models = build_models(plain, cfg, self.algo, self.device, initial_dir=self.initial_dir, ckpt=ckpt)
        self.models = models
        self.actor, self.critic = models.policy, models.critic
        self.engine = engine_class(cfg.rollout.engine).build(cfg, self.actor.source(), self.tokenizer, self.device)
        self.sync_engine()
        self.params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                     top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)
        self.passes = Passes(cfg.optim.token_budget, cfg.rollout.temperature, cfg.model.chunk_size)
        self.source = PromptSource(self.task, self.tokenizer, rank=self.rank, world=self.world,
                                   tools=self.rollout.prompt_tools())
        self.step = state.get("step", 0)
        self.tally = Tally.from_state(state)  # what the run learned from so far
        self.elapsed = state.get("elapsed", 0.0)
        self.eval_before = state.get("eval_before")
        self.checkpoints.restore()  # optimizer, schedulers, RNG and data position of the checkpoint resumed
        if self.rank == 0:
            save_config_atomically(resolved_config(cfg, self.algo), self.run_dir / "config.yaml")

    @property
    def policy(self) -> torch.nn.Module:
        """The policy module as trained (bare, DDP-wrapped or FSDP2-sharded; a PEFT model under LoRA)."""
        return self.actor.model

    def _initial_dir(self) -> Path:
        """The model a fresh run starts from; a warm start of the built-in model is made by rank 0 alone,
        the other ranks wait for it and then read it from the cache."""
        progress = self.cfg.run.progress and self.rank == 0
        if self.rank == 0:
            path = bootstrap.initial_model_dir(self.cfg, progress=progress)
        parallel.barrier()
        return path if self.rank == 0 else bootstrap.initial_model_dir(self.cfg, progress=False)

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
            self.rollout.close()  # the reward or environment workers (a later evaluate or fit starts new ones)
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
                while self.step < self.algo.steps and not any_rank(stop.requested, self.device):
                    self._step(log)
                if any_rank(stop.requested, self.device):
                    ckpt = self.save()
                    message = f"stopped by {stop.name} after step {self.step}, saved in {ckpt}"
                    log.write(message)
                    raise Interrupted(message, signum=stop.signum, step=self.step, run_dir=self.run_dir)
                # a signal from here on lets the run finish: all that is left is the final evaluation
                final = self.evaluate()
                log.log(self.step, {f"eval/{k}": v for k, v in final.items()})
                self.save()
                summary = self.write_summary(final) if self.rank == 0 else {}
                self.tally.check_end()  # a run that learned from no token does not end as a success
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
        metrics["time/step_seconds"] = time.perf_counter() - start
        metrics["time/elapsed"] = self.elapsed + metrics["time/step_seconds"]
        gathered = time.perf_counter()
        metrics = parallel.combine_over_ranks(metrics, summed=SUMMED_OVER_RANKS)
        metrics["time/log_s"] = time.perf_counter() - gathered  # the metrics gathered over ranks
        self.tally.add(metrics)
        # every rank (the metrics are combined); the step that makes a broken streak long enough is not counted
        self.tally.check_streak(cfg.optim.max_bad_steps)
        self.step += 1
        self.elapsed += time.perf_counter() - start
        if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 and self.step < self.algo.steps:
            metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
        log.log(self.step, metrics)
        log.advance()
        if cfg.run.save_every and self.step % cfg.run.save_every == 0:
            self.save()

    def train_step(self, step: int) -> dict[str, float]:
        cfg, timer = self.cfg, StageTimer()
        threads = self.governor.pick()
        self.models.eval()
        got = collect(self.engine, self.source, self.rollout, self.params, self.algo,
                      num_groups=cfg.rollout.prompts_per_step // self.world, group_size=cfg.rollout.group_size,
                      seed=_mix(cfg.run.seed, step), timer=timer)
        self.engine.sleep()  # GPU vLLM: its KV cache is freed for the update; sync_engine wakes it
        metrics = dict(got.metrics, **{"time/threads": float(threads)})
        # every rank must take the same number of optimizer steps (they all-reduce gradients), so the
        # smallest batch over ranks sets the minibatch count, and if one rank has none, none trains
        smallest = parallel.global_min(got.batch.batch_size if got.batch is not None else 0, self.device)
        if smallest == 0:
            self.engine.wake_up()
            return {**metrics, "actor/skipped_updates": 0.0, "actor/updates": 0.0, **timer.metrics()}
        minibatches = self._minibatches(smallest)
        inputs = self.prepare(got, metrics, minibatches, timer)
        self.models.train()
        gen = torch.Generator().manual_seed(_mix(cfg.run.seed, step, self.rank, 7))
        warmup = self.critic is not None and step <= cfg.algo.critic_warmup  # only the critic learns
        with timer("update"):
            update_metrics, _ = run_updates(
                inputs, self.actor, self.algo, epochs=self.algo.epochs, minibatches=minibatches, passes=self.passes,
                generator=gen, critic=self.critic, value_clip=cfg.algo.value_clip, train_actor=not warmup)
        metrics.update(update_metrics, **({"critic/warmup_step": 1.0} if warmup else {}))
        with timer("sync"):
            self.sync_engine()
        return {**metrics, **timer.metrics()}

    def sync_engine(self) -> None:
        """An engine with weights of its own (a copy, vLLM) gets the policy's current weights."""
        self.engine.follow(self.actor.export_weights)

    def prepare(self, got: Collected, metrics: dict[str, float], minibatches: int | None = None,
                timer: StageTimer | None = None) -> UpdateInputs:
        """Old and reference log-probs and advantages: what the update needs for `minibatches` per epoch
        (None: as many as this batch allows)."""
        cfg, algo, batch, timer = self.cfg, self.algo, got.batch, timer or StageTimer()
        loss_mask = batch.loss_tokens.float()  # [N, T] the model's tokens (not an environment's)
        if algo.overlong_filter:
            loss_mask = loss_mask * (~batch.truncated).float()[:, None]
        start_batch(self.moe, batch, self.actor.model)  # MoE r2: the old policy's routing, still unknown
        # One minibatch: the update's first pass runs before any optimizer step, so it gives the old
        # log-probs itself (run_updates keeps them for later epochs); no separate pass is needed.
        old_logp = ref_logp = None
        # rejection compares the old policy's log-probs with the rollout's before the update: they need the pass
        if (minibatches or self._minibatches(batch.batch_size)) > 1 or algo.rejection:
            with timer("old_logprobs"):  # MoE r2: this pass records the old policy's routing
                old_logp = batch_logprobs(self.actor.model, batch, self.passes, hook=self.moe, record=True)
        if algo.rejection:  # rejected tokens leave the loss and its denominators, as in verl
            keep, stats = rejection_mask(old_logp, batch.sampling_logp, loss_mask, algo.rejection)  # [N, T]
            loss_mask = loss_mask * keep
            metrics.update({f"rejection/{k}": float(v) for k, v in stats.items()})
        if self.actor.has_reference:
            with timer("ref_logprobs"), self.actor.reference() as reference:
                ref_logp = batch_logprobs(reference, batch, self.passes)
        with timer("advantages"):
            estimator = algo.estimator
            critic = self.critic.model if estimator.uses_critic else None
            values = batch_values(critic, batch, token_budget=cfg.optim.token_budget) if critic else None  # [N, T]
            kl = None
            if estimator.kl_in_reward and ref_logp is not None and algo.kl_coef != 0.0:
                # the penalty needs log pi_old before the advantages, so before the update: a no-grad pass even
                # with one minibatch (the update's first forward cannot serve, its loss needs these advantages)
                old = old_logp if old_logp is not None else batch_logprobs(self.actor.model, batch, self.passes,
                                                                           hook=self.moe)  # [N, T]
                kl = kl_penalty(old, ref_logp, algo.kl_estimator)  # [N, T]
            found = estimate(algo.advantage, AdvantageInputs(
                got.rewards.to(self.device), loss_mask, cfg.rollout.group_size, values=values, kl=kl,
                reward_parts=got.reward_parts.to(self.device), reward_weights=got.reward_weights,
                total=global_count, turn_rewards=batch.turn_rewards),
                AdvantageSettings(adv_scale=algo.adv_scale or "group", gamma=cfg.algo.gamma, lam=cfg.algo.lam,
                                  kl_coef=algo.kl_coef))
        metrics.update(found.metrics)
        counted = loss_mask.sum().clamp(min=1).item()
        if values is not None:
            metrics["critic/value_mean_rollout"] = (values * loss_mask).sum().item() / counted
        if kl is not None:
            metrics["actor/kl_ref_reward"] = (kl * loss_mask).sum().item() / counted
        # a KL in the reward is not also a term of the loss; a monitored one goes to the update to be measured
        in_loss = None if kl is not None else ref_logp
        return UpdateInputs(batch, loss_mask, found.advantages, old_logp, in_loss, old_values=values,
                            returns=found.returns, hook=self.moe)

    # ---- evaluation, checkpoints, summary -------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy; under torchrun each rank takes every world-th problem, and the
        counts are summed over ranks."""
        self.governor.pick()
        self.models.eval()
        mine = self.heldout[self.rank :: self.world]
        got = self.rollout.evaluate(self.engine, self.task, mine, self.cfg.rollout.max_new_tokens)
        # every other key is a mean over the problems (episodes: `turns`), summed over ranks as counts too
        means = [k for k in got if k != "n"]
        *totals, n = parallel.sum_over_ranks([got[k] * got["n"] for k in means] + [got["n"]], self.device)
        return {**{k: round(total) / max(n, 1) for k, total in zip(means, totals, strict=True)}, "n": int(n)}

    def save(self) -> Path | None:
        """Checkpoint the current step (every rank takes part; rank 0 gets the folder, the others None)."""
        return self.checkpoints.save()

    def write_summary(self, final: dict[str, float]) -> dict[str, Any]:
        t = self.tally
        return write_summary(self.run_dir, {
            "algo": self.algo.name, "task": self.cfg.task.name, "steps": self.step,
            "wall_time_s": round(self.elapsed, 2), "heldout_accuracy_before": self.eval_before["accuracy"],
            "heldout_accuracy_after": final["accuracy"], "heldout_n": final["n"], "updates": t.updates,
            "skipped_updates": t.skipped, "tokens_trained": t.tokens, "learned": t.learned,
            # any other held-out measure of the rollout's evaluation (episodes: model turns per episode)
            **{f"heldout_{k}_{when}": got.get(k) for k in final if k not in ("accuracy", "n")
               for when, got in (("before", self.eval_before), ("after", final))},
        }, title=f"{self.algo.name} on {self.cfg.task.name}")

    # ---- helpers ----------------------------------------------------------------------------------
    def _minibatches(self, batch_size: int) -> int:
        """Configured minibatches, fewer when dynamic sampling came back short (never an empty one)."""
        return max(1, min(self.algo.minibatches, batch_size // self.cfg.rollout.group_size))


def train(cfg: TrainConfig, *, run_dir: Path | None = None, resume: bool = False) -> RunResult:
    return Trainer(cfg, run_dir=run_dir, resume=resume).fit()


def _mix(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (the same in every process and on resume)."""
    h = 0x9E3779B1
    for p in parts:
        h = (h * 0x01000193 ^ (p & 0xFFFFFFFF)) & 0x7FFFFFFF
    return h


__all__ = ["RunResult", "Trainer", "train"]
