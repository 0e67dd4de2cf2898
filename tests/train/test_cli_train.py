"""The command line on a nano model: eval --json, sft, train on a user's data file, config errors, run and
checkpoint folders as --model."""

import json
import shutil

import pytest

from gradus.cli import main
from gradus.config import ConfigError
from gradus.models import load_pretrained
from gradus.train.bootstrap import resolve_model_dir
from gradus.train.checkpoint import MARKER

from .conftest import tiny_overrides


def test_eval_json(nano_dir, capsys):
    assert main(["eval", "--model", str(nano_dir), "--task", "arithmetic", "--k", "2", "--n", "4", "--json",
                 "rollout.max_new_tokens=4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 4 and out["k"] == 2 and 0 <= out["accuracy"] <= out["pass_at_k"] <= 1


def test_sft_saves_a_loadable_model(nano_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(nano_dir), "--output", str(out), "--no-progress", "sft.steps=3",
                 "sft.batch_size=4", "sft.warmup_steps=1"]) == 0
    model, tok = load_pretrained(out)
    base, _ = load_pretrained(nano_dir)
    changed = [not (a == b).all() for a, b in zip(model.parameters(), base.parameters(), strict=True)]
    assert any(changed) and "sft/loss" in capsys.readouterr().out


def test_train_on_a_user_data_file(nano_dir, tmp_path, capsys, signal_reward):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+{i}=", "a": str(2 * i)}) + "\n" for i in range(40)))
    args = [a for a in tiny_overrides(nano_dir, tmp_path, **{"task.heldout_size": 4})]
    assert main(["train", "--data", str(data), "task.prompt_field=q", "task.answer_field=a",
                 f"task.rewards={signal_reward}", "--name", "userdata", *args]) == 0
    summary = json.loads((tmp_path / "userdata" / "summary.json").read_text())
    assert summary["task"] == "file" and summary["steps"] == 2


def test_config_error_exit_code(capsys):
    assert main(["train", "algo.clip_hihg=0.3"]) == 2
    assert "did you mean 'algo.clip_high'" in capsys.readouterr().err
    assert main(["train", "--help-config"]) == 0
    assert "algo.clip_high" in capsys.readouterr().out


def _fake_run(nano_dir, root):
    """A run folder as the trainer leaves it: step 1 and 2 complete, step 3 cut off mid-save (no marker).
    Only step 2 holds a loadable policy, so loading any other one fails."""
    ckpts = root / "run" / "checkpoints"
    for step, complete in ((1, True), (2, True), (3, False)):
        policy = ckpts / f"step-{step:06d}" / "policy"
        if step == 2:
            shutil.copytree(nano_dir, policy)
            (policy.parent / "state.pt").write_bytes(b"state")  # what a complete checkpoint holds besides policy/
        else:
            policy.mkdir(parents=True)
        if complete:
            (policy.parent / MARKER).write_text(str(step))
    return root / "run", ckpts / "step-000002"


def test_eval_accepts_a_run_folder_or_a_checkpoint_and_says_which_policy(nano_dir, tmp_path, capsys):
    run, ckpt = _fake_run(nano_dir, tmp_path)
    for given, said in ((run, "is a run folder"), (run / "checkpoints", "is a run folder"),
                        (ckpt, "is a checkpoint")):
        assert main(["eval", "--model", str(given), "--task", "arithmetic", "--k", "0", "--n", "2", "--json",
                     "rollout.max_new_tokens=2"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out.strip().splitlines()[-1])["n"] == 2
        assert said in captured.err and f"{ckpt / 'policy'}" in captured.err


def test_model_folders_that_hold_no_usable_checkpoint(nano_dir, tmp_path):
    run, ckpt = _fake_run(nano_dir, tmp_path)
    assert resolve_model_dir(nano_dir) == (nano_dir, None)
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        resolve_model_dir(run / "checkpoints" / "step-000003")
    shutil.rmtree(run / "checkpoints" / "step-000001")
    shutil.rmtree(ckpt)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_model_dir(run)
