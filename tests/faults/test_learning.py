"""A run that learned nothing does not end as a success: every optimizer step skipped for NaN/inf, every token
weighted 0 by a mismatch correction, or no group with a signal to learn from. It used to exit 0 whenever the
run was shorter than optim.max_bad_steps (and a fully masked or signal-less run exited 0 at any length); now
the summary says `learned: false` and the command exits 1 naming the cause. Each case failed on the old code."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_untrained
from train.conftest import tiny_overrides

from gradus.cli import main
from gradus.config import load_config
from gradus.train import update as update_module
from gradus.train.tally import NothingLearned
from gradus.train.trainer import Trainer


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return save_untrained(tmp_path_factory.mktemp("nano_moe"), "nano", arch="qwen2_moe")


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_run_whose_every_update_was_skipped_exits_1_saying_so(moe_dir, tmp_path, capsys, signal_reward):
    # model.router_aux_coef=1e30 makes every loss inf: 2 steps (below max_bad_steps' 5) used to end with exit 0
    args = tiny_overrides(moe_dir, tmp_path, **{"model.router_aux_coef": 1e30, "run.steps": 2, "run.name": "inf",
                                               "task.rewards": signal_reward})
    assert main(["train", *args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "gradus: run stopped: the run learned from no token in its 2 step(s)" in err, err
    assert "2 optimizer step(s) skipped for NaN/inf losses or gradients" in err
    summary = _summary(tmp_path / "inf")
    assert summary["learned"] is False and summary["updates"] == 0 and summary["skipped_updates"] == 2


def _zero_weights(monkeypatch):
    """A mismatch correction that gives every token weight 0 (what a band without ratio 1 did)."""
    real = update_module.rollout_correction

    def masks_all(algo, train_logp, rollout_logp, mask):
        _, stats = real(algo, train_logp, rollout_logp, mask)
        return torch.zeros_like(mask), stats

    monkeypatch.setattr(update_module, "rollout_correction", masks_all)


def test_every_token_masked_stops_after_max_bad_steps_with_the_cause(nano_dir, tmp_path, monkeypatch, signal_reward):
    _zero_weights(monkeypatch)
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "run.steps": 10, "optim.max_bad_steps": 3, "task.rewards": signal_reward})))
    with pytest.raises(NothingLearned, match="3 steps in a row trained no token: every token was masked"):
        trainer.fit()
    assert trainer.step == 2  # the third masked step stopped the run before being counted


def test_a_short_fully_masked_run_fails_at_its_end(nano_dir, tmp_path, monkeypatch, signal_reward):
    _zero_weights(monkeypatch)
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "run.steps": 2, "task.rewards": signal_reward, "run.name": "masked"})))
    with pytest.raises(NothingLearned, match="2 step.s. with every token at weight 0"):
        trainer.fit()
    summary = _summary(tmp_path / "masked")  # written before the failure, with the checkpoint
    assert summary["learned"] is False and summary["updates"] == 2 and summary["tokens_trained"] == 0


def test_dapo_with_no_group_that_differs_fails_naming_it(nano_dir, tmp_path, capsys):
    # an untrained model never answers right: numeric_match is 0 for every completion, so every group is flat
    args = tiny_overrides(nano_dir, tmp_path, **{"algo.name": "dapo", "task.rewards": "numeric_match",
                                                 "algo.overlong_shaping": "false",  # lengths would differ
                                                 "run.steps": 2, "run.name": "flat"})
    assert main(["train", *args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 step(s) with no group whose rewards differ" in err, err
    assert _summary(tmp_path / "flat")["learned"] is False


def test_a_run_that_learned_says_so(nano_dir, tmp_path, signal_reward):
    """The counter is no false alarm: a run with a signal counts its tokens and ends normally."""
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "run.steps": 2, "task.rewards": signal_reward, "run.name": "ok"})))
    trainer.fit()
    summary = _summary(tmp_path / "ok")
    assert summary["learned"] is True and summary["tokens_trained"] > 0 and summary["updates"] == 2
