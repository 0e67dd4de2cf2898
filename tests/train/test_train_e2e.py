"""Few-step runs of the whole loop on a nano model: every algorithm, resume, faults."""

import json

import pytest
import torch

from gradus.config import ConfigError, load_config
from gradus.models import load_pretrained
from gradus.objectives import ALGORITHMS
from gradus.train import update as update_module
from gradus.train.checkpoint import latest_checkpoint, load_state
from gradus.train.resume import resume_config
from gradus.train.runlog import read_metrics
from gradus.train.trainer import Trainer, train

from .conftest import dies_at, tiny_overrides


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_every_algo_runs_end_to_end(algo, nano_dir, tmp_path, signal_reward):
    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "algo.name": algo, "optim.minibatches": 2, "task.rewards": signal_reward}))
    result = train(cfg)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["algo"] == algo and summary["steps"] == 2
    assert 0 <= summary["heldout_accuracy_after"] <= 1
    records = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [r for r in records if "reward/mean" in r]
    assert len(steps) == 2 and all(r["actor/updates"] >= 1 for r in steps if "actor/updates" in r)
    assert (result.run_dir / "curves.png").stat().st_size > 1000
    assert (result.run_dir / "config.yaml").is_file()
    assert any((result.run_dir / "tensorboard").iterdir())
    # the checkpoint's policy loads with plain transformers
    model, _ = load_pretrained(latest_checkpoint(result.run_dir) / "policy")
    assert sum(p.numel() for p in model.parameters()) > 0
    if algo == "ppo":
        assert "critic/loss" in steps[0] and "critic/explained_var" in steps[0]
        assert (latest_checkpoint(result.run_dir) / "critic" / "config.json").is_file()
    if algo == "grpo":
        assert steps[0]["actor/kl_ref"] >= 0
    if algo == "sapo":
        assert 0 < steps[0]["actor/gate_weight_mean"] <= 1


def test_training_changes_the_policy_on_policy_ratio_is_one(nano_dir, tmp_path, signal_reward):
    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"run.steps": 1, "task.rewards": signal_reward}))
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.fit()
    records = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "actor/ratio_mean" in r]
    # one minibatch, one epoch: exactly on-policy, so every ratio is exactly 1
    assert records[0]["actor/ratio_min"] == 1.0 and records[0]["actor/ratio_max"] == 1.0
    assert records[0]["reward/std"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(algo, nano_dir, tmp_path, monkeypatch, signal_reward):
    extra = {"algo.name": algo, "run.steps": 4, "run.save_every": 2, "optim.minibatches": 2,
             "task.rewards": signal_reward}
    straight = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path / "a", **extra)))
    straight.fit()

    killed = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path / "b", **extra)))
    with dies_at(monkeypatch, 3):
        killed.fit()
    assert latest_checkpoint(killed.run_dir).name == "step-000002"

    resumed = Trainer(resume_config(killed.run_dir, []), run_dir=killed.run_dir, resume=True)
    assert resumed.step == 2
    resumed.fit()
    for a, b in zip(_params(straight.policy), _params(resumed.policy), strict=True):
        assert torch.equal(a, b)
    initial = _params(load_pretrained(nano_dir)[0])
    assert any(not torch.equal(a, b) for a, b in zip(initial, _params(resumed.policy), strict=True))
    if algo == "ppo":
        for a, b in zip(_params(straight.critic.model), _params(resumed.critic.model), strict=True):
            assert torch.equal(a, b)
    steps = [r["step"] for r in read_metrics(killed.run_dir / "metrics.jsonl") if "reward/mean" in r]
    assert steps == [1, 2, 3, 4]  # no step logged twice


def test_a_keyboard_interrupt_inside_a_step_saves_nothing(nano_dir, tmp_path, monkeypatch):
    """A KeyboardInterrupt raised mid-step (a second Ctrl-C) leaves a half-done step: never saved.
    (A first Ctrl-C finishes the step and saves it: tests/faults/test_interrupts.py.)"""
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"run.steps": 5,
                                                                                  "run.save_every": 1})))
    with dies_at(monkeypatch, 3, KeyboardInterrupt()):
        trainer.fit()
    assert latest_checkpoint(trainer.run_dir).name == "step-000002"
    assert load_state(latest_checkpoint(trainer.run_dir))["step"] == 2


def test_nan_update_is_skipped_and_logged_then_training_goes_on(nano_dir, tmp_path, monkeypatch, signal_reward):
    real = update_module.objective_loss
    calls = {"n": 0}

    def nan_first(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 1 else loss), metrics

    monkeypatch.setattr(update_module, "objective_loss", nan_first)
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "run.steps": 2, "task.rewards": signal_reward})))
    before = _params(trainer.policy)
    real_step = trainer.train_step
    snapshots = []

    def watch(step):
        out = real_step(step)
        snapshots.append(_params(trainer.policy))
        return out

    trainer.train_step = watch
    trainer.fit()
    records = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "actor/skipped_updates" in r]
    assert [r["actor/skipped_updates"] for r in records] == [1.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(before, snapshots[0], strict=True))  # step 1 changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(before, snapshots[1], strict=True))


def test_many_nan_updates_in_a_row_stop_the_run(nano_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(update_module, "objective_loss",
                        lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "run.steps": 10, "optim.max_bad_steps": 3})))
    with pytest.raises(update_module.NonFiniteUpdate, match="3 steps in a row"):
        trainer.fit()
    assert trainer.step == 2  # the third bad step raised before being counted


def test_missing_model_and_empty_dataset_fail_before_any_work(tmp_path, nano_dir):
    with pytest.raises(ConfigError, match="model.path.*config.json"):
        Trainer(load_config(overrides=tiny_overrides(tmp_path / "nowhere", tmp_path)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="task"):
        Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
            "task.name": "file", "task.data_file": str(empty)})))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("grpo")]  # no run folder was made


def test_ppo_critic_warmup_trains_only_the_critic(nano_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "algo.name": "ppo", "run.steps": 2, "algo.critic_warmup": 1, "task.rewards": signal_reward})))
    actor0, critic0 = _params(trainer.policy), _params(trainer.critic.model)
    trainer.train_step(1)
    assert all(torch.equal(a, b) for a, b in zip(actor0, _params(trainer.policy), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(critic0, _params(trainer.critic.model), strict=True))
    trainer.train_step(2)
    assert any(not torch.equal(a, b) for a, b in zip(actor0, _params(trainer.policy), strict=True))
