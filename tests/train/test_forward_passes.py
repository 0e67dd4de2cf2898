"""How many policy forwards one training step computes: each one must be needed.

The count is taken on the policy's input embeddings, which every forward of the model calls once
(whatever path the log-probs take through it), from the end of sampling to the end of the update.
"""

import pytest
import torch

import gradus.train.trainer as trainer_module
from gradus.config import load_config
from gradus.train.trainer import Trainer

from .conftest import tiny_overrides


def _policy_forwards(trainer, monkeypatch):
    """Run one training step; return the grad mode of each policy forward after sampling, in order."""
    seen, counting = [], []
    embeddings = trainer.policy.get_input_embeddings()

    def hook(*_):
        if counting:
            seen.append(torch.is_grad_enabled())

    handle = embeddings.register_forward_hook(hook)
    collect = trainer_module.collect

    def collect_then_count(*args, **kwargs):
        got = collect(*args, **kwargs)
        counting.append(True)
        return got

    monkeypatch.setattr(trainer_module, "collect", collect_then_count)
    try:
        metrics = trainer.train_step(1)
    finally:
        handle.remove()
    return seen, metrics


def _trainer(nano_dir, tmp_path, **extra):
    # one micro-batch per pass: each pass is one forward
    return Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"optim.token_budget": 100_000,
                                                                               **extra})))


def test_ppo_computes_one_policy_pass_before_the_update_for_its_kl_reward(nano_dir, tmp_path, monkeypatch):
    """PPO's per-token KL reward needs log pi_old before the advantages, so before the update: one no-grad
    pass. It cannot come from the update's first forward, whose loss needs those advantages (keeping that
    forward's graph over the whole batch until they exist would defeat optim.token_budget)."""
    trainer = _trainer(nano_dir, tmp_path, **{"algo.name": "ppo"})
    assert (trainer.algo.epochs, trainer.algo.minibatches, trainer.algo.kl_coef) == (2, 1, 0.02)
    seen, metrics = _policy_forwards(trainer, monkeypatch)
    assert seen == [False, True, True]  # the KL reward's pass, then one forward per epoch
    assert "actor/kl_ref_reward" in metrics


def test_ppo_with_a_monitored_kl_computes_no_pass_of_its_own(nano_dir, tmp_path, monkeypatch):
    """kl_coef 0 with algo.monitor_kl: the KL is only a metric, which the update measures on the forwards
    it computes anyway, as for every other algorithm (was: a no-grad pass only for that metric)."""
    base = {"algo.name": "ppo", "algo.kl_coef": 0.0}
    watched = _trainer(nano_dir, tmp_path / "a", **base, **{"algo.monitor_kl": "true"})
    assert watched.actor.has_reference
    seen, metrics = _policy_forwards(watched, monkeypatch)
    assert seen == [True, True]
    # on the first step the policy is the reference: the measured KL is 0 up to rounding
    assert metrics["actor/kl_ref"] == pytest.approx(0.0, abs=1e-6)
    plain = _trainer(nano_dir, tmp_path / "b", **base)
    plain.train_step(1)
    for a, b in zip(plain.policy.parameters(), watched.policy.parameters(), strict=True):
        assert torch.equal(a, b)  # the same update: measuring the KL changed nothing
    for a, b in zip(plain.critic.model.parameters(), watched.critic.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("minibatches", "expected"), [(1, [True, True]), (2, [False, True, True, True, True])])
def test_grpo_computes_old_logprobs_only_with_several_minibatches(minibatches, expected, nano_dir, tmp_path,
                                                                  monkeypatch):
    trainer = _trainer(nano_dir, tmp_path, **{"algo.name": "grpo", "algo.kl_coef": 0.0, "optim.epochs": 2,
                                              "optim.minibatches": minibatches})
    seen, _ = _policy_forwards(trainer, monkeypatch)
    assert seen == expected
