"""tiny_overrides and dies_at; the nano_dir and signal_reward fixtures are in tests/conftest.py."""

from contextlib import contextmanager

import pytest

from gradus.train.trainer import Trainer


def tiny_overrides(nano_dir, tmp_path, **extra):
    base = {
        "model.path": str(nano_dir), "run.out_dir": str(tmp_path), "run.progress": "false",
        "run.steps": "2", "run.eval_every": "0", "run.save_every": "0", "task.heldout_size": "8",
        "rollout.prompts_per_step": "4", "rollout.group_size": "4", "rollout.max_new_tokens": "6",
        "run.cache_dir": str(tmp_path / "cache"),
        "algo.name": "grpo",  # what these tests were written for (the default algorithm is DAPO since 2026-11)
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@contextmanager
def dies_at(monkeypatch, step, error=None):
    """While the block runs, `Trainer.train_step` raises `error` (default SystemExit("killed"): no checkpoint on
    the way out, unlike KeyboardInterrupt) when step `step` starts; the block must end with it, and the real
    step is back afterwards."""
    error = SystemExit("killed") if error is None else error
    real = Trainer.train_step

    def dying(self, at):
        if at == step:
            raise error
        return real(self, at)

    monkeypatch.setattr(Trainer, "train_step", dying)
    try:
        with pytest.raises(type(error)):
            yield
    finally:
        monkeypatch.setattr(Trainer, "train_step", real)
