"""The command line's own surface: help, version, `python -m gradus`, errors for unknown names and flags."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gradus.cli import main
from gradus.config import TrainConfig
from gradus.demo import run_toy

ROOT = Path(__file__).resolve().parents[1]


def test_algos_table_lists_every_preset_and_defaults(capsys):
    assert main(["algos"]) == 0
    out = capsys.readouterr().out
    assert "| clip_high | 0.2 | 0.2 | 0.28 | 0.0004 |" in out
    assert "| tau_neg | - | - | - | - | - | 1.05 |" in out


def test_demo_learns_and_rejects_unknown_algo(capsys):
    before, after = run_toy("grpo", steps=10)
    assert before == pytest.approx(1 / 8) and after > 0.5
    assert main(["demo", "--algos", "grpo,trpo"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing trained before the typo was caught
    err = captured.err.strip()
    assert "\n" not in err and "unknown algo 'trpo'" in err and "valid algos: ppo, grpo" in err


def test_help_names_the_real_default_task(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"on {TrainConfig().task.name})" in out


def test_version_is_pyproject_version(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"gradus {version}\n"


def test_python_dash_m_gradus():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "gradus", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: gradus "), done.stderr


def test_a_mistyped_flag_shows_the_subcommand_usage_and_the_nearest_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--stesp", "5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gradus train ") and "--stesp (did you mean --steps?)" in err
