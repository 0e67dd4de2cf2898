"""Step 6 of a training step: the actor (and, for PPO, critic) updates over a rollout batch.

`epochs` passes; each splits the rows into `minibatches` optimizer steps; each minibatch is run in
micro-batches of at most `token_budget` (rows x padded length) tokens, with gradients accumulated.
Aggregation denominators are those of the whole minibatch (summed over data-parallel ranks when
torch.distributed is initialised), so accumulation and sharding give the gradient of the
minibatch loss exactly. Micro-batches are trimmed to their own longest prompt and completion:
no compute is spent on padding columns.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gradus import parallel
from gradus.algorithm import ResolvedAlgo
from gradus.logprobs import completion_logprobs
from gradus.models import completion_values
from gradus.objectives import (
    agg_loss,
    correction_weights,
    covariance_metrics,
    kl_penalty,
    mismatch_metrics,
    objective_loss,
    perplexity,
    sequence_log_ratio,
    value_loss,
)
from gradus.parallel import equal_pieces, gradient_sync
from gradus.rollout import RolloutBatch
from gradus.runtime import Optim
from gradus.train.passes import ForwardHook, Passes, around, micro_batches


@dataclass
class UpdateInputs:
    """Per-row training targets, aligned with `batch` rows and its completion columns."""

    batch: RolloutBatch
    loss_mask: torch.Tensor  # [N, T] 1 = token counts in the loss
    advantages: torch.Tensor  # [N] or [N, T]
    old_logp: torch.Tensor | None  # [N, T]; None: exactly on-policy, use the current logp detached
    ref_logp: torch.Tensor | None  # [N, T]; None: no KL term in the loss
    old_values: torch.Tensor | None = None  # [N, T] estimators with a critic
    returns: torch.Tensor | None = None  # [N, T] estimators with a critic
    hook: ForwardHook | None = None  # runs around each forward of the policy (an MoE policy's routing replay)


class NonFiniteUpdate(RuntimeError):
    """Too many consecutive updates had a NaN or inf loss or gradient."""


def global_count(x: torch.Tensor) -> torch.Tensor:
    """A count summed over data-parallel ranks (identity in a single process)."""
    if parallel.active():
        x = x.clone()
        dist.all_reduce(x)
    return x


def sync_gradients(models: list[torch.nn.Module], finite: bool) -> bool:
    """Data parallel: agree on whether every rank's losses were finite, and sum over ranks each gradient that
    no wrapper summed already.

    Losses are divided by global counts (`agg_counts`), so the sum of the ranks' gradients is the
    gradient of the whole minibatch's loss; after it every rank holds the same gradient, takes the same
    optimizer step and keeps the same weights. DDP and FSDP2 sum them in the last backward (their
    communication set up in `gradus.parallel.modes`); a bare model in a process group (a test's, a user's own
    launcher) gets one flat all-reduce here. Identity in a single process.
    Returns False on every rank when any rank saw a non-finite loss (then no rank steps).
    """
    if not parallel.active():
        return finite
    device = next(models[0].parameters()).device if models else torch.device("cpu")
    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() == 0.0:
        return False
    for model in models:
        if parallel.is_wrapped(model):  # DDP and FSDP2 reduced the gradients in the last backward
            continue
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # same layout on every rank, whatever this rank's graph touched
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return True


def agg_counts(mode: str, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The global denominator `agg_loss` needs for `mode`, from a minibatch's mask."""
    if mode == "token-mean":
        return {"num_tokens": global_count(loss_mask.sum().float())}
    return {"num_seqs": global_count((loss_mask.sum(-1) > 0).sum().float())}


# How a metric of one micro-batch combines into its minibatch (and minibatches into the step):
# partial sums of a globally normalised loss add up, extremes take the extreme, the rest are
# means weighted by each piece's share of the loss tokens (for per-sequence metrics, such as GSPO's
# clip fractions, that weight is approximate when a minibatch spans several micro-batches).
SUMMED = ("pg_loss", "kl_ref", "tokens_trained")
TOTALS = ("tokens_trained",)  # over a batch's optimizer steps too: a count, not a mean
EXTREMES = {"ratio_min": min, "ratio_max": max, "p_abs_diff_max": max, "seq_log_ratio_abs_max": max, "cov_max": max}


def _name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def merge_metric(acc: dict[str, float], key: str, value: float, weight: float) -> None:
    name = key.rsplit("/", 1)[-1]
    if name in EXTREMES:
        acc[key] = EXTREMES[name](acc[key], value) if key in acc else value
    else:
        acc[key] = acc.get(key, 0.0) + (value if name in SUMMED else value * weight)


def run_updates(
    inputs: UpdateInputs,
    actor: Optim,
    algo: ResolvedAlgo,
    *,
    epochs: int,
    minibatches: int,
    passes: Passes,
    generator: torch.Generator,
    critic: Optim | None = None,
    value_clip: float | None = None,
    train_actor: bool = True,
) -> tuple[dict[str, float], int]:
    """All optimizer steps on one rollout batch. Returns (mean metrics, number of skipped steps).
    With train_actor=False (a critic's warm-up) only the critic learns. `inputs.hook` runs around every
    forward of the policy, and the auxiliary loss it asks for (an MoE router's load balancing) joins the actor's
    loss with its weight."""
    n = inputs.batch.batch_size
    if minibatches > n:
        raise ValueError(f"optim.minibatches ({minibatches}) exceeds the rollout batch size ({n})")
    if inputs.old_logp is None and minibatches > 1:
        raise ValueError("old_logp is needed with several minibatches: only the first is on-policy")
    # One minibatch and no old log-probs: the first epoch runs before any optimizer step, so its own
    # detached log-probs are the old ones; keep them for the later epochs (no separate pass).
    captured = torch.zeros_like(inputs.loss_mask) if inputs.old_logp is None and epochs > 1 else None
    # no old-policy pass: the first epoch's forwards are the old policy's (as its log-probs), and a hook that
    # keeps what the old policy did (MoE r2's routing) records them
    hook = inputs.hook
    recording = hook is not None and hook.records_first_epoch(epochs)
    sums: dict[str, float] = defaultdict(float)
    steps = skipped = 0
    for _ in range(epochs):
        if captured is not None and inputs.old_logp is None and steps > skipped:
            # the policy has moved: from now on the captured first-pass values are the old log-probs
            # (while every step so far was skipped, the policy is unchanged and the capture goes on)
            inputs = dataclasses.replace(inputs, old_logp=captured)
        if recording and steps > skipped:
            hook.recorded()
            recording = False
        order = torch.randperm(n, generator=generator) if epochs * minibatches > 1 else torch.arange(n)
        for rows in order.tensor_split(minibatches):
            metrics = _minibatch_step(inputs, rows.sort().values, actor, algo, passes, critic=critic,
                                      value_clip=value_clip, train_actor=train_actor, capture=captured,
                                      record=recording, generator=generator)
            steps += 1
            if metrics is None:
                skipped += 1
                continue
            for k, v in metrics.items():
                if k.rsplit("/", 1)[-1] in EXTREMES:
                    merge_metric(sums, k, v, 1.0)
                else:
                    sums[k] += v
    done = max(steps - skipped, 1)
    out = {k: v if _name(k) in EXTREMES or _name(k) in TOTALS else v / done for k, v in sums.items()}
    out["actor/updates"] = float(steps - skipped)
    out["actor/skipped_updates"] = float(skipped)
    return out, skipped


def _minibatch_step(
    inputs: UpdateInputs,
    rows: torch.Tensor,
    actor: Optim,
    algo: ResolvedAlgo,
    passes: Passes,
    *,
    critic: Optim | None,
    value_clip: float | None,
    train_actor: bool = True,
    capture: torch.Tensor | None = None,
    record: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, float] | None:
    """Accumulate gradients over the micro-batches of `rows`, then one optimizer step per model.
    Returns None (and applies nothing) when a loss or gradient is not finite."""
    obj = algo.objective
    device = inputs.batch.device
    mask_mb = inputs.loss_mask[rows.to(device)]
    counts = agg_counts(obj.agg, mask_mb)
    value_counts = agg_counts("token-mean", mask_mb)
    sums: dict[str, float] = defaultdict(float)
    finite = True
    models = ([actor] if train_actor else []) + ([critic] if critic is not None else [])
    # The same number of micro-batches on every rank (FSDP2 gathers weights in each forward); only the
    # last backward synchronises gradients. A non-finite loss does not stop the loop early: every rank
    # must make the same calls, and the agreement below skips the step everywhere.
    pieces = equal_pieces(micro_batches(rows, inputs.batch, passes.token_budget), device)
    step = _MicroStep(inputs, mask_mb, actor, algo, passes, counts, value_counts, critic, value_clip, capture, record,
                      sums, generator)
    for i, (micro, real) in enumerate(pieces):
        with gradient_sync([o.model for o in models], enabled=i == len(pieces) - 1):
            finite &= (step.actor if train_actor else step.critic_only)(micro.to(device), real)
    finite = sync_gradients([o.model for o in models], finite)
    norms = [parallel.clip_grad_norm(o.model, o.grad_clip) for o in models] if finite else []
    if not finite or not all(math.isfinite(x) for x in norms):
        for o in models:
            o.optimizer.zero_grad(set_to_none=True)
        return None
    for o in models:
        o.optimizer.step()
        o.scheduler.step()
        o.optimizer.zero_grad(set_to_none=True)
    for o, norm in zip(models, norms, strict=True):
        sums[f"{'actor' if o is actor else 'critic'}/grad_norm"] = float(norm)
    sums["actor/lr"] = actor.scheduler.get_last_lr()[0] if train_actor else 0.0
    return dict(sums)


@dataclass
class _MicroStep:
    """Forward and backward of one micro-batch of a minibatch; a padding micro-batch (real=False, see
    parallel.equal_pieces) runs with its losses times 0 and logs nothing."""

    inputs: UpdateInputs
    mask_mb: torch.Tensor  # [M, T] the minibatch's loss mask
    actor_optim: Optim
    algo: ResolvedAlgo
    passes: Passes
    counts: dict[str, torch.Tensor]  # the actor loss's global denominators
    value_counts: dict[str, torch.Tensor]  # token-mean denominators (value loss, router loss)
    critic: Optim | None
    value_clip: float | None
    capture: torch.Tensor | None  # [N, T] one minibatch, epochs > 1: the first pass's log-probs are kept here
    record: bool  # this forward runs the old policy: the hook may keep what it saw (MoE r2's routing)
    sums: dict[str, float]
    generator: torch.Generator  # the step's: an objective's random draws (Clip-Cov) repeat on resume

    def _sub(self, idx: torch.Tensor, real: bool) -> tuple[RolloutBatch, torch.Tensor, float]:
        sub = self.inputs.batch.select(idx).trim()
        mask = self.inputs.loss_mask[idx, : sub.completion_ids.shape[1]]  # [m, T]
        share = mask.sum().item() / max(self.mask_mb.sum().item(), 1) if real else 0.0  # of the minibatch's tokens
        return sub, mask, share

    def critic_only(self, idx: torch.Tensor, real: bool) -> bool:
        sub, mask, share = self._sub(idx, real)
        return _critic_backward(self.critic, sub, self.inputs, idx, mask, self.value_clip, self.value_counts, share,
                                self.sums, real)

    def actor(self, idx: torch.Tensor, real: bool) -> bool:
        """False if a loss was not finite."""
        inputs, algo, obj, passes = self.inputs, self.algo, self.algo.objective, self.passes
        sub, mask, share = self._sub(idx, real)
        T = sub.completion_ids.shape[1]
        hook = inputs.hook
        model = self.actor_optim.model
        with around(hook, model, inputs.batch, sub, idx, record=self.record, real=real):
            logp, entropy, *aux = completion_logprobs(model, sub.input_ids, sub.attention_mask,
                                                      sub.completion_start, temperature=passes.temperature,
                                                      chunk_size=passes.chunk_size, with_entropy=True,
                                                      router_aux=hook is not None and hook.aux_coef > 0)
        hook_stats = hook.stats if hook is not None else {}
        if inputs.old_logp is None:
            old = logp.detach()
            if self.capture is not None and real:
                self.capture[idx, :T] = old
        else:
            old = inputs.old_logp[idx, :T]
        weight, mismatch = rollout_correction(algo, old, sub.sampling_logp, mask)
        mismatch.update(perplexity_view(logp.detach(), old, sub.sampling_logp, mask))
        adv = inputs.advantages[idx] if inputs.advantages.dim() == 1 else inputs.advantages[idx, :T]  # [m] / [m, T]
        loss, m = objective_loss(obj, logp, old, adv, mask, token_weight=weight, generator=self.generator,
                                 **self.counts)
        m["pg_loss"] = loss.item()
        # tokens that can move the policy: counted, with an advantage, not weighted away by a correction
        per_token = adv if adv.dim() == 2 else adv[:, None].expand_as(mask)  # [m, T]
        live = (mask > 0) & (per_token != 0)  # [m, T]
        if weight is not None:
            live &= weight != 0
        m["tokens_trained"] = float(live.sum())  # [m, T] summed
        # entropy's driver, for every algorithm: the covariance of log-prob and advantage (Cui et al. 2025)
        m.update({k: float(v) for k, v in covariance_metrics(logp.detach(), adv, mask).items()})
        if aux:  # the router's load-balancing loss, this micro-batch's share of the minibatch's tokens
            m["router_aux_loss"] = aux[0].item()
            loss = loss + hook.aux_coef * aux[0] * (mask.sum() / self.value_counts["num_tokens"].clamp(min=1))
        if inputs.ref_logp is not None:
            # with kl_coef 0 (algo.monitor_kl) the KL is only measured: no graph, no gradient
            with torch.set_grad_enabled(algo.kl_coef != 0.0):
                kl = agg_loss(kl_penalty(logp, inputs.ref_logp[idx, :T], algo.kl_estimator), mask, obj.agg,
                              norm=obj.agg_norm, **self.counts)
            if algo.kl_coef != 0.0:
                loss = loss + algo.kl_coef * kl
            m["kl_ref"] = kl.item()
        m["entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
        finite = bool(torch.isfinite(loss))
        (loss if real else loss * 0.0).backward()
        if real and finite:
            for k, v in m.items():
                merge_metric(self.sums, f"actor/{k}", v, share)
            for k, v in {**mismatch, **hook_stats}.items():
                merge_metric(self.sums, k, v, share)
        if self.critic is not None:
            finite &= _critic_backward(self.critic, sub, inputs, idx, mask, self.value_clip, self.value_counts,
                                       share, self.sums, real)
        return finite


def perplexity_view(logp: torch.Tensor, old: torch.Tensor, rollout: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, float]:
    """The seed's perplexity view of GSPO, as diagnostics: the mean perplexity of the sampled completions
    under the rollout engine, the old policy (trainer) and the current policy, and the mean sequence ratio
    s_i = PPL_old(y_i) / PPL_theta(y_i) (= exp of the mean token log-ratio). [m, T] each."""
    rows = (mask.sum(-1) > 0).float()  # [m] non-empty rows
    n = rows.sum().clamp(min=1)
    stats = {
        "ppl/rollout": (perplexity(rollout, mask) * rows).sum() / n,
        "ppl/old": (perplexity(old, mask) * rows).sum() / n,
        "ppl/policy": (perplexity(logp, mask) * rows).sum() / n,
        "ppl/seq_ratio": (torch.exp(sequence_log_ratio(logp, old, mask)) * rows).sum() / n,
    }
    values = torch.stack([v.to(torch.float64) for v in stats.values()]).tolist()
    return dict(zip(stats, values, strict=True))


def rollout_correction(algo: ResolvedAlgo, train_logp: torch.Tensor, rollout_logp: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The per-token weights of `algo.correction` (None for "none": the loss is left exactly as it is) and the
    metrics of the gap between the engine's log-probs and the trainer's on these tokens. [m, T] each."""
    low, high = algo.correction_bounds
    band = (low if low is not None else 1.0 / high, high) if high is not None else (0.5, 2.0)
    stats = {f"mismatch/{k}": v for k, v in mismatch_metrics(train_logp, rollout_logp, mask,
                                                              low=band[0], high=band[1]).items()}
    weight = None
    if algo.correction != "none":
        weight, correction = correction_weights(train_logp, rollout_logp, mask, algo.correction, low=low, high=high)
        stats.update({f"correction/{k}": v for k, v in correction.items()})
    names = sorted(stats)  # one device-to-host transfer for all of them
    values = torch.stack([stats[k].to(torch.float64) for k in names]).tolist()
    return weight, dict(zip(names, values, strict=True))


def _critic_backward(critic: Optim, sub: RolloutBatch, inputs: UpdateInputs, idx: torch.Tensor, mask: torch.Tensor,
                     value_clip: float | None, counts: dict[str, torch.Tensor], weight: float,
                     sums: dict[str, float], real: bool = True) -> bool:
    """Clipped value loss of one micro-batch, backward (times 0 for a padding micro-batch); False if it is
    not finite."""
    T = mask.shape[1]
    values = completion_values(critic.model, sub.input_ids, sub.attention_mask, sub.completion_start)  # [m, T]
    vloss, vm = value_loss(values, inputs.old_values[idx, :T], inputs.returns[idx, :T], mask,
                           clip=value_clip, agg="token-mean", **counts)
    finite = bool(torch.isfinite(vloss))
    (vloss if real else vloss * 0.0).backward()
    if real and finite:
        sums["critic/loss"] += vloss.item()
        for k, v in vm.items():
            sums[f"critic/{k}"] += v * weight
    return finite
