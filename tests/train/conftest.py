import pytest

from gradus.models import build_char_tokenizer, build_tiny_model, save_pretrained


@pytest.fixture(scope="session")
def nano_dir(tmp_path_factory):
    """A nano Qwen2 model with the char tokenizer, saved in HF format (no SFT: tests need speed, not skill)."""
    path = tmp_path_factory.mktemp("nano")
    tokenizer = build_char_tokenizer()
    save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, seed=0), tokenizer, path)
    return path


def tiny_overrides(nano_dir, tmp_path, **extra):
    base = {
        "model.path": str(nano_dir), "run.out_dir": str(tmp_path), "run.progress": "false",
        "run.steps": "2", "run.eval_every": "0", "run.save_every": "0", "task.heldout_size": "8",
        "rollout.prompts_per_step": "4", "rollout.group_size": "4", "rollout.max_new_tokens": "6",
        "run.cache_dir": str(tmp_path / "cache"),
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def signal_reward(tmp_path, monkeypatch):
    """An untrained model never answers right; this user reward pays for digits, so groups differ."""
    (tmp_path / "my_rewards.py").write_text(
        "def digits(prompts, completions, **fields):\n"
        "    return [sum(ch.isdigit() for ch in c) / 10 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards:digits:0.5,numeric_match"
