"""Data-parallel faults that used to surface late or crash, each refused before any training now. The
torchrun-level cases (a rank killed or stuck, SIGTERM to torchrun, a bad config on every rank, a killed
job resumed) launch real jobs and live in tests/train/test_torchrun.py."""

from __future__ import annotations

import datetime
import json

import pytest
import torch.distributed as dist
from train.conftest import tiny_overrides

from gradus.config import ConfigError, load_config
from gradus.models import build_char_tokenizer, build_tiny_model, save_pretrained
from gradus.train.trainer import Trainer


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of one rank (gloo), as under `torchrun --nproc-per-node 1`."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_head_that_is_not_w_h_plus_b_is_a_config_error_at_load(tmp_path):
    # it used to pass every check and fail at the first log-prob pass, after the first evaluation and rollout
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("nano", tokenizer=tokenizer, seed=0)
    save_pretrained(model, tokenizer, tmp_path / "scaled")
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    config["logit_scale"] = 2.0  # Cohere-style scaled logits
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model.path: .*logit_scale"):
        Trainer(load_config(overrides=tiny_overrides(tmp_path / "scaled", tmp_path)))
    assert not (tmp_path / "grpo").exists()


def test_lora_with_fsdp2_is_refused_on_a_single_rank_too(nano_dir, tmp_path, one_rank_group):
    # one torchrun rank sharded the PEFT model, trained a step, then crashed writing the checkpoint
    overrides = tiny_overrides(nano_dir, tmp_path, **{"model.lora_r": 4, "run.parallel": "fsdp2"})
    with pytest.raises(ConfigError, match="model.lora_r > 0 with run.parallel=fsdp2"):
        Trainer(load_config(overrides=overrides))


def test_a_one_process_checkpoint_is_refused_under_fsdp2_before_any_work(nano_dir, tmp_path, signal_reward):
    # it resumed, sampled, and crashed at the first optimizer step (mixed Tensor and DTensor state)
    overrides = tiny_overrides(nano_dir, tmp_path, **{"task.rewards": signal_reward, "run.steps": 1,
                                                      "run.name": "solo"})
    Trainer(load_config(overrides=overrides)).fit()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = load_config(overrides=[*overrides, "run.parallel=fsdp2", "run.steps=2"])
        with pytest.raises(ConfigError, match="written by a single process; resume it with run.parallel=ddp"):
            Trainer(cfg, run_dir=tmp_path / "solo", resume=True)
    finally:
        dist.destroy_process_group()
