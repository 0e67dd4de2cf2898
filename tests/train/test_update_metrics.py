"""The update's metrics do not depend on how a minibatch is cut into micro-batches, and a KL that is
only monitored is measured without touching the loss."""

import copy

import pytest
import torch

from gradus.config import load_config
from gradus.runtime import build_optim
from gradus.train.generation import collect
from gradus.train.passes import Passes
from gradus.train.trainer import Trainer, _mix
from gradus.train.update import merge_metric, run_updates

from .conftest import tiny_overrides


def _one_batch(trainer):
    cfg = trainer.cfg
    got = collect(trainer.engine, trainer.source, trainer.rollout, trainer.params, trainer.algo,
                  num_groups=cfg.rollout.prompts_per_step, group_size=cfg.rollout.group_size, seed=_mix(0, 1))
    return trainer.prepare(got, {})


def _optim(model, trainer):
    """The optimizer the trainer builds for its policy, for `model`."""
    cfg, algo = trainer.cfg, trainer.algo
    return build_optim(model, cfg.optim.lr, weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip,
                       warmup=cfg.optim.warmup_steps, total=algo.steps * algo.epochs * algo.minibatches,
                       schedule=cfg.optim.schedule)


def _updates(trainer, inputs, token_budget):
    # a fresh copy of the model and optimizer: both budgets start from the same weights
    actor = _optim(copy.deepcopy(trainer.policy), trainer)
    return run_updates(inputs, actor, trainer.algo, epochs=1, minibatches=2, passes=Passes(token_budget, 1.0, 64),
                       generator=torch.Generator().manual_seed(3))[0]


@pytest.mark.parametrize("algo", ["grpo", "gspo"])
def test_metrics_do_not_depend_on_the_token_budget(algo, nano_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "algo.name": algo, "algo.kl_coef": 0.1, "optim.minibatches": 2, "task.rewards": signal_reward,
        "rollout.prompts_per_step": 4, "rollout.group_size": 4})))
    inputs = _one_batch(trainer)
    whole = _updates(trainer, inputs, token_budget=10_000)  # each minibatch in one piece
    longest = int((inputs.batch.prompt_mask.sum(-1) + inputs.batch.lengths).max())
    pieces = _updates(trainer, inputs, token_budget=longest)  # one row per micro-batch
    assert whole["actor/updates"] == pieces["actor/updates"] == 2
    names = ["actor/pg_loss", "actor/kl_ref", "actor/ratio_min", "actor/ratio_max", "actor/entropy"]
    if algo == "grpo":  # token-level metrics are token-weighted means, so exact; GSPO's are per sequence
        names += ["actor/clip_frac_high", "actor/clip_frac_low", "actor/ratio_mean"]
    for name in names:
        assert pieces[name] == pytest.approx(whole[name], rel=1e-4, abs=1e-6), name
    # the second minibatch is off-policy, so the ratio spread is real, not 1 everywhere
    assert whole["actor/ratio_max"] > 1.0 > whole["actor/ratio_min"]


def test_merge_metric_kinds():
    acc = {}
    # two micro-batches holding 1/4 and 3/4 of the tokens
    for value, weight in ((2.0, 0.25), (4.0, 0.75)):
        merge_metric(acc, "actor/entropy", value, weight)  # weighted mean: 0.5 + 3.0
        merge_metric(acc, "actor/pg_loss", value, weight)  # partial sums of one loss: 2 + 4
        merge_metric(acc, "actor/ratio_min", value, weight)
        merge_metric(acc, "actor/ratio_max", value, weight)
    assert acc == {"actor/entropy": 3.5, "actor/pg_loss": 6.0, "actor/ratio_min": 2.0, "actor/ratio_max": 4.0}


def test_monitored_kl_is_logged_but_not_in_the_loss(nano_dir, tmp_path, signal_reward):
    base = {"algo.name": "dapo", "task.rewards": signal_reward, "algo.dynamic_sampling": "false"}
    plain = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path / "a", **base)))
    watched = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path / "b", **base,
                                                           **{"algo.monitor_kl": "true"})))
    assert not plain.actor.has_reference and watched.actor.has_reference
    m_plain, m_watched = plain.train_step(1), watched.train_step(1)
    assert "actor/kl_ref" not in m_plain
    # on the first step the policy is the reference, so the KL is 0 up to rounding
    assert m_watched["actor/kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert m_watched["actor/pg_loss"] == m_plain["actor/pg_loss"]
    for a, b in zip(plain.policy.parameters(), watched.policy.parameters(), strict=True):
        assert torch.equal(a, b)  # same update: the monitored KL added nothing to the gradient
    m2 = watched.train_step(2)
    assert m2["actor/kl_ref"] > 0  # after one update the policy has moved away from the reference


def test_first_pass_gives_the_old_logprobs_for_later_epochs(nano_dir, tmp_path, signal_reward):
    """Two epochs over one minibatch: no separate old-logp pass gives exactly the same update as one."""
    from gradus.train.passes import batch_logprobs

    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "algo.kl_coef": 0.0, "optim.epochs": 3, "task.rewards": signal_reward})))
    inputs = _one_batch(trainer)
    assert inputs.old_logp is None  # one minibatch: the trainer skips the pass
    passed = copy.copy(inputs)
    passed.old_logp = batch_logprobs(trainer.policy, inputs.batch, Passes(10_000, 1.0, 64))
    results = []
    for given in (inputs, passed):
        model = copy.deepcopy(trainer.policy)
        actor = _optim(model, trainer)
        metrics, _ = run_updates(given, actor, trainer.algo, epochs=3, minibatches=1, passes=Passes(10_000, 1.0, 64),
                                 generator=torch.Generator().manual_seed(3))
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m_lazy, p_lazy), (m_pass, p_pass) = results
    assert m_lazy["actor/updates"] == 3
    assert m_lazy["actor/ratio_max"] > 1.0  # epochs 2 and 3 are off-policy against the captured values
    assert m_lazy["actor/ratio_max"] == pytest.approx(m_pass["actor/ratio_max"], rel=1e-6)
    for a, b in zip(p_lazy, p_pass, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
