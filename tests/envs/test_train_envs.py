"""Training on multi-turn episodes: every kind of algorithm, the environment's tokens out of the loss, exact
resume, evaluation and the metrics."""

import json
from pathlib import Path

import pytest
import torch
from train.conftest import dies_at, tiny_overrides

from gradus.cli import main
from gradus.config import load_config
from gradus.train import update as update_module
from gradus.train.checkpoint import latest_checkpoint
from gradus.train.resume import resume_config
from gradus.train.runlog import read_metrics
from gradus.train.trainer import Trainer, train

DIGITS = f"{Path(__file__).with_name('sample_envs.py')}:Digits"


def _overrides(nano_dir, tmp_path, **extra):
    return tiny_overrides(nano_dir, tmp_path, **{"env.name": DIGITS, "env.max_turns": 3, "env.max_tokens": 24,
                                                 **extra})


@pytest.mark.parametrize("algo", ["grpo", "dapo", "ppo", "gspo", "sapo", "cispo", "dr_grpo"])
def test_every_kind_of_algorithm_trains_on_episodes(algo, nano_dir, tmp_path, monkeypatch):
    seen = []
    real = update_module.run_updates

    def spy(inputs, *args, **kwargs):
        seen.append(inputs)
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr("gradus.train.trainer.run_updates", spy)
    result = train(load_config(overrides=_overrides(nano_dir, tmp_path, **{"algo.name": algo,
                                                                           "optim.minibatches": 2})))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["learned"]
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval/turns" in r]
    assert [summary["heldout_turns_before"], summary["heldout_turns_after"]] == [evals[0]["eval/turns"],
                                                                                 evals[-1]["eval/turns"]]
    assert 1 <= summary["heldout_turns_after"] <= 3
    steps = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward/mean" in r]
    assert steps[0]["env/turns_mean"] > 1 and steps[0]["env/env_tokens"] > 0 and "env/env_s" in steps[0]
    assert seen, "no update ran"
    for inputs in seen:
        b = inputs.batch
        assert b.action_mask is not None and (b.action_mask == 0).logical_and(b.completion_mask == 1).any()
        # the loss counts the model's tokens only; the environment's carry no advantage (nor a return)
        assert torch.equal(inputs.loss_mask, b.loss_tokens.float())
        if inputs.advantages.dim() == 2:  # per token (GAE): none on the environment's tokens
            assert torch.all(inputs.advantages[b.loss_tokens == 0] == 0)
        if algo == "ppo":
            assert torch.all(inputs.returns[b.loss_tokens == 0] == 0)


def test_resume_of_an_episode_run_equals_an_uninterrupted_run(nano_dir, tmp_path, monkeypatch):
    extra = {"algo.name": "grpo", "run.steps": 4, "run.save_every": 2}
    straight = Trainer(load_config(overrides=_overrides(nano_dir, tmp_path / "a", **extra)))
    straight.fit()
    killed = Trainer(load_config(overrides=_overrides(nano_dir, tmp_path / "b", **extra)))
    with dies_at(monkeypatch, 3):
        killed.fit()
    assert latest_checkpoint(killed.run_dir).name == "step-000002"
    resumed = Trainer(resume_config(killed.run_dir, []), run_dir=killed.run_dir, resume=True)
    resumed.fit()
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_eval_reports_success_and_turns(nano_dir, tmp_path, capsys):
    argv = ["eval", "--model", str(nano_dir), "--env", DIGITS, "--n", "6", "--json", "--no-progress",
            "env.max_turns=3", "env.max_tokens=24", "rollout.max_new_tokens=6"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["n"] == 6 and 1 <= got["turns"] <= 3 and 0 <= got["accuracy"] <= 1


def test_lora_trains_on_episodes(nano_dir, tmp_path):
    result = train(load_config(overrides=_overrides(nano_dir, tmp_path, **{"model.lora_r": 4, "optim.lr": 0.01})))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["learned"] and summary["tokens_trained"] > 0
    assert (latest_checkpoint(result.run_dir) / "policy" / "adapter_model.safetensors").is_file()


def test_compare_runs_episodes(nano_dir, tmp_path, capsys):
    argv = ["compare", "--algos", "grpo,dapo", "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "cmp"),
            "--no-progress", *[o for o in _overrides(nano_dir, tmp_path)
                               if not o.startswith(("run.out_dir", "run.steps", "run.progress", "algo.name"))]]
    assert main(argv) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "grpo" in report and "dapo" in report


def test_r2_and_r3_replay_routing_on_episodes(tmp_path, monkeypatch):
    from conftest import save_untrained

    from gradus.train import moe

    moe_dir = save_untrained(tmp_path / "moe", "nano", arch="qwen2_moe")
    seen = []
    original = moe.training_forward
    monkeypatch.setattr(moe, "training_forward", lambda m, experts: seen.append(experts) or original(m, experts))
    train(load_config(overrides=_overrides(moe_dir, tmp_path, **{"algo.routing_replay": "r2",
                                                                  "optim.minibatches": 2, "run.steps": 1})))
    assert seen and seen[0] is None  # the old log-prob pass routes freely and records
    assert any(f is not None and (f >= 0).any() for f in seen[1:])  # the updates replay it
    seen.clear()
    result = train(load_config(overrides=_overrides(moe_dir, tmp_path, **{"algo.routing_replay": "r3",
                                                                           "run.steps": 1})))
    assert seen and all(f is not None and (f >= 0).any() for f in seen)  # every forward replays the rollout's
    step = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward/mean" in r][0]
    # the rollout's routing, replayed: the training forward routes as the engine did where it is known
    assert step["routing/layer_mismatch_frac"] == 0.0
