"""Commands asked for something they would do wrong: a selection given empty (it ran the full default
comparison, 1 h 41 min) and any command but `train` under torchrun (each rank ran all of it, printed everything
twice and wrote the same folder). Each is refused before any work with what to run instead. Every case here
failed on the code before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradus
import gradus.compare
from gradus import cli
from gradus.cli import main
from gradus.compare.runner import validate_plan


class Started(Exception):
    """Raised by a stand-in for the work a command would start: it was not refused."""


@pytest.fixture
def no_training(monkeypatch):
    """`gradus compare` checks its plan as it does (a bad one is refused there), then stops before training."""
    def start(plan, out, **_):
        validate_plan(plan, out)
        raise Started(plan.algos)

    monkeypatch.setattr(gradus.compare, "run_compare", start)


@pytest.mark.parametrize("algos", ["", " ", ",,", " , "])
def test_compare_with_an_empty_algos_selection_is_refused(algos, no_training, tmp_path, capsys):
    assert main(["compare", "--algos", algos, "--out", str(tmp_path / "cmp")]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"gradus: config error: --algos {algos!r} names no algorithm; give one or more, comma-separated "
                    "(e.g. --algos grpo,dapo), or leave --algos out for the default, ppo,grpo,dapo,gspo,sapo")
    assert not (tmp_path / "cmp").exists()


def test_resume_refuses_an_algos_flag_even_empty(no_training, tmp_path, capsys):
    assert main(["compare", "--resume", str(tmp_path), "--algos", ""]) == 2
    assert "--resume continues a comparison as it was asked" in capsys.readouterr().err


def test_demo_with_an_empty_algos_selection_is_refused(capsys):
    assert main(["demo", "--algos", "", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().startswith("gradus: config error: --algos '' names no algorithm")


# ---- torchrun: only `gradus train` splits its work over the ranks ----------------------------------------

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(("args", "instead"), [
    (["compare", "--algos", "grpo"], "--jobs N trains N of its runs at once"),
    (["sft", "--output", "OUT"], "torchrun ... -m gradus train --model OUTPUT"),
    (["eval", "--model", "M"], "run it without torchrun"),
    (["export", "RUN", "--out", "OUT"], "run it without torchrun"),
    (["algos"], "run it without torchrun"),
])
def test_every_command_but_train_is_refused_under_torchrun(args, instead, monkeypatch, capsys):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    for name in ("cmd_compare", "cmd_sft", "cmd_eval", "cmd_export"):  # would the command start its work?
        monkeypatch.setattr(cli, name, lambda _args: (_ for _ in ()).throw(Started()))
    assert main(args) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"gradus: config error: gradus {args[0]} does not run under torchrun") and instead in line
    assert "\n" not in line and "Only gradus train is a torchrun job" in line
    monkeypatch.setenv("RANK", "1")  # every rank is refused; only rank 0 says so
    assert main(args) == 2 and capsys.readouterr().err == ""


def test_train_is_not_refused_under_torchrun(monkeypatch):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "cmd_train", lambda _args: (_ for _ in ()).throw(Started()))
    with pytest.raises(Started):
        main(["train"])


def test_torchrun_compare_ends_at_once_with_one_line(nano_dir, tmp_path):
    """The real launcher, two ranks on gloo: before the fix each rank trained the whole comparison."""
    src = str(Path(gradus.__file__).parents[1])  # the gradus under test, whatever the venv installed
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gradus",
           "compare", "--algos", "grpo", "--seeds", "1", "--steps", "1", "--out", str(out), "--no-progress",
           f"model.path={nano_dir}", f"run.cache_dir={tmp_path / 'cache'}", "task.heldout_size=4",
           "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "run.eval_every=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("gradus: ")]
    assert len(said) == 1 and said[0].startswith("gradus: config error: gradus compare does not run under torchrun")
    assert not out.exists()
