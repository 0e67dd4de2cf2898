"""Data-parallel faults that used to surface late or crash: refused before any training now, or (a checkpoint
resumed under another layout) made to work. The torchrun-level cases (a rank killed or stuck, SIGTERM to
torchrun, a bad config on every rank, a killed job resumed) launch real jobs and live in
tests/train/test_torchrun.py."""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train.conftest import dies_at, tiny_overrides

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


def test_a_one_process_checkpoint_resumes_under_fsdp2_and_the_reverse(nano_dir, tmp_path, signal_reward, monkeypatch):
    """A checkpoint carries its optimizer states by parameter name (DCP), so it resumes under another layout:
    a one-process run's under FSDP2 (it used to crash at the first optimizer step, mixing Tensor and DTensor
    state), and an FSDP2 run's in one process; each continues as the uninterrupted one-process run."""
    from gradus.train.resume import resume_config
    from gradus.train.runlog import read_metrics

    base = {"task.rewards": signal_reward, "run.steps": 4, "run.save_every": 2, "optim.minibatches": 2}
    straight = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **base, **{"run.name": "straight"})))
    straight.fit()
    want = {k: v.detach().clone() for k, v in straight.policy.named_parameters()}

    def stop_after_step_2(layout: str, name: str) -> None:
        with _group_if(layout == "fsdp2", tmp_path / f"pg-{name}"), dies_at(monkeypatch, 3):
            Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **base, **{
                "run.name": name, "run.parallel": layout}))).fit()

    for first, then in (("ddp", "fsdp2"), ("fsdp2", "ddp")):  # "ddp" in one process: no wrapper at all
        name = f"{first}-then-{then}"
        stop_after_step_2(first, name)
        with _group_if(then == "fsdp2", tmp_path / f"pg2-{name}"):
            resumed = Trainer(resume_config(tmp_path / name, [f"run.parallel={then}"]), run_dir=tmp_path / name,
                              resume=True)
            assert resumed.step == 2
            resumed.fit()
            got = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in resumed.policy.named_parameters()}
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=f"{name}: {k}")
        steps = [r["step"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "reward/mean" in r]
        assert steps == [1, 2, 3, 4], name


@contextlib.contextmanager
def _group_if(wanted: bool, init: Path):
    """A one-rank gloo process group around the block (as under `torchrun --nproc-per-node 1`), if wanted."""
    if not wanted:
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
