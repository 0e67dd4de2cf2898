"""Errors that reach the command line: each of gradus' own error classes ends as one line on stderr,
`gradus: <kind>: <message>`, with a non-zero exit code, and any other exception keeps its traceback. The
CLI runs in-process (`gradus.cli.main`). Every case here failed on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from train.conftest import tiny_overrides

from gradus.cli import main
from gradus.config import load_config
from gradus.tasks import FileTask
from gradus.train import bootstrap
from gradus.train import sft as sft_module
from gradus.train import update as update_module
from gradus.train.trainer import Trainer


def _one_line(err: str) -> str:
    """stderr that is exactly one line (no traceback); that line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _without_eos(nano, tmp_path):
    """A copy of the nano model whose tokenizer and generation config name no EOS (PAD is kept)."""
    copy = tmp_path / "no_eos"
    shutil.copytree(nano, copy)
    for name, key in (("tokenizer_config.json", "eos_token"), ("generation_config.json", "eos_token_id")):
        data = json.loads((copy / name).read_text())
        data.pop(key, None)
        (copy / name).write_text(json.dumps(data))
    return copy


def _sft(model, tmp_path, *args: str) -> list[str]:
    return ["sft", "--model", str(model), "--output", str(tmp_path / "out"), "--no-progress",
            "sft.steps=2", "sft.batch_size=4", "sft.warmup_steps=1", f"run.cache_dir={tmp_path / 'cache'}", *args]


# ---- sft ------------------------------------------------------------------------------------------------

def test_sft_with_a_tokenizer_without_eos_is_refused_before_training(nano_dir, tmp_path, capsys, monkeypatch):
    no_eos = _without_eos(nano_dir, tmp_path)
    steps = []
    real_loss = sft_module.sft_loss
    monkeypatch.setattr(sft_module, "sft_loss", lambda *a, **k: steps.append(1) or real_loss(*a, **k))
    with pytest.warns(UserWarning, match="no EOS token the model can emit"):  # load_model's warning, as for eval
        assert main(_sft(no_eos, tmp_path, "--task", "arithmetic")) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"gradus: model error: {no_eos}: the tokenizer has no EOS token")
    assert f'set "eos_token" in {no_eos / "tokenizer_config.json"}' in line
    assert not steps and not (tmp_path / "out").exists()


def test_sft_refuses_prompts_longer_than_the_model_positions(nano_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    rows = [{"question": f"{i}+{i}=" + ("1" * 600 if i == 2 else ""), "answer": str(2 * i)} for i in range(60)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(_sft(nano_dir, tmp_path, "--data", str(data))) == 2
    err = capsys.readouterr().err
    assert "gradus: config error: task: 1 row(s) of" in err and "too long for the model" in err
    assert f"{data}: row 3 (line 3): a prompt of 604 tokens" in err and "512 positions" in err
    assert not (tmp_path / "out").exists()


# ---- model files: a corrupt critic on resume ---------------------------------------------------------

def test_resume_with_a_corrupt_critic_is_one_line_naming_the_file(nano_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"algo.name": "ppo"}))
    ckpt = Trainer(cfg, run_dir=run).save()  # a checkpoint at step 0, with policy/ and critic/
    weights = ckpt / "critic" / "model.safetensors"
    # same size (the checkpoint's manifest still matches), but the header claims more bytes than the file has
    with weights.open("r+b") as handle:
        handle.write((weights.stat().st_size * 4).to_bytes(8, "little"))
    capsys.readouterr()  # the set-up's own output
    assert main(["train", "--resume", str(run)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"gradus: model error: {weights}") and "re-download or re-save" in line, line


def test_resume_skips_a_checkpoint_whose_files_lost_bytes(nano_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"algo.name": "ppo"}))
    ckpt = Trainer(cfg, run_dir=run).save()
    weights = ckpt / "critic" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"gradus: skipping checkpoint {ckpt}: critic/model.safetensors has") and len(err) == 2
    assert err[1].startswith("gradus: config error: --resume: no complete checkpoint in")


# ---- data files -------------------------------------------------------------------------------------------

def test_dataset_error_is_one_line_and_a_bug_keeps_its_traceback(nano_dir, tmp_path, capsys, monkeypatch):
    # build_task turns a DatasetError into a ConfigError; here a task builder lets one through unchanged
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    monkeypatch.setattr(bootstrap, "build_task", lambda cfg: FileTask(cfg.task.data_file))
    assert main(["eval", "--model", str(nano_dir), "--data", str(empty), "--k", "0"]) == 2
    assert _one_line(capsys.readouterr().err) == f"gradus: data error: {empty}: the file is empty"

    def bug(cfg):
        raise ValueError("a bug in gradus")  # a ValueError, like ConfigError's base, is not a user error

    monkeypatch.setattr(bootstrap, "build_task", bug)
    with pytest.raises(ValueError, match="a bug in gradus"):
        main(["eval", "--model", str(nano_dir), "--task", "arithmetic", "--k", "0"])


# ---- a run stopped for NaN -----------------------------------------------------------------------------

def test_run_stopped_for_nan_ends_with_its_message_and_exit_1(nano_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(update_module, "objective_loss",
                        lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
    args = tiny_overrides(nano_dir, tmp_path, **{"run.steps": 10, "optim.max_bad_steps": 2, "run.name": "nan"})
    assert main(["train", *args]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("gradus: run stopped: 2 steps in a row had only NaN/inf losses or gradients")


def test_a_trainer_that_cannot_be_built_leaves_no_reward_workers(nano_dir, tmp_path):
    """--resume of a folder with no checkpoint fails after the reward workers started: they are stopped."""
    from gradus.config import ConfigError

    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path))
    started = []
    real_init = Trainer._build

    def build_and_remember(self, *args, **kwargs):
        started.extend(self.rollout.pids())
        return real_init(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "_build", build_and_remember)
    try:
        with pytest.raises(ConfigError, match="no complete checkpoint") as failure:
            Trainer(cfg, run_dir=tmp_path / "empty-run", resume=True)
    finally:
        mp.undo()
    assert started
    # `failure` still holds the traceback, so the half-built trainer is alive: its workers must be gone anyway,
    # stopped by the trainer itself, not later by garbage collection
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(_alive(pid) for pid in started):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in started) and failure.value is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read() if os.path.exists(f"/proc/{pid}/stat") else ""
    return " Z " not in stat  # a zombie has ended; its parent has not collected it yet
