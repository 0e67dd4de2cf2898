"""Fixtures and helpers shared by every test folder: an untrained nano model on disk and a user reward."""

from pathlib import Path

import pytest

from gradus.models import build_char_tokenizer, build_tiny_model, save_pretrained

# An untrained model never answers right; this reward pays for digits, so a group's rewards differ and
# every update moves the parameters.
DIGITS_REWARD = ("def digits(prompts, completions, **fields):\n"
                 "    return [sum(ch.isdigit() for ch in c) / 10 for c in completions]\n")


def write_digits_reward(folder: Path, module: str) -> str:
    """Write the digits reward as `folder/module.py`; returns the task.rewards spec that uses it."""
    (Path(folder) / f"{module}.py").write_text(DIGITS_REWARD)
    return f"{module}:digits:0.5,numeric_match"


def save_untrained(folder: Path, size: str, arch: str = "qwen2") -> Path:
    """An untrained built-in model of `size` and `arch` with the char tokenizer, saved in HF format in `folder`."""
    tokenizer = build_char_tokenizer()
    save_pretrained(build_tiny_model(size, tokenizer=tokenizer, arch=arch, seed=0), tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def nano_dir(tmp_path_factory):
    """A nano Qwen2 model with the char tokenizer, saved in HF format (no SFT: tests need speed, not skill)."""
    return save_untrained(tmp_path_factory.mktemp("nano"), "nano")


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory):
    """The built-in micro size, untrained (head size 32: vLLM's CPU attention has no kernel for nano's 16)."""
    return save_untrained(tmp_path_factory.mktemp("micro"), "micro")


@pytest.fixture
def signal_reward(tmp_path, monkeypatch):
    """The digits reward as a user reward module on sys.path; returns its task.rewards spec."""
    spec = write_digits_reward(tmp_path, "my_rewards")
    monkeypatch.syspath_prepend(str(tmp_path))
    return spec
