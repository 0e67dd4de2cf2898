"""The rollout fast path (`DirectDecoder`) reads the weights of stock dense Qwen2/Llama layers itself, so
it must refuse every model it would compute wrongly, and `LocalEngine` must then fall back to the model's
own forward and say so once in the log. Each refusal is checked against a model that really differs
(an adapter, a hook, an injected layer): the fallback's greedy tokens are those of HF `generate` on the
same modified model, which the fast path would not give."""

from __future__ import annotations

import datetime
import logging

import pytest
import torch
import torch.distributed as dist
from test_rollout import PAD, PROMPTS, tiny_qwen2
from torch import nn

from gradus.rollout import LocalEngine, SamplingParams
from gradus.rollout import local as local_mod
from gradus.rollout.decoders import DirectDecoder, direct_unsupported_reason

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def greedy(model: nn.Module, backend: str = "auto") -> torch.Tensor:
    return LocalEngine(model, pad_token_id=PAD, eos_token_ids=[], backend=backend).generate(
        PROMPTS, 1, GREEDY).completion_ids


def test_the_stock_model_takes_the_fast_path():
    model = tiny_qwen2()
    assert direct_unsupported_reason(model) is None
    assert LocalEngine(model, pad_token_id=PAD, eos_token_ids=[]).uses_direct()


def test_injected_lora_is_refused_and_sampled_with_its_adapter():
    peft = pytest.importorskip("peft")
    model = tiny_qwen2()
    base_tokens = greedy(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, model)  # in place: the class is still Qwen2ForCausalLM
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert "not nn.Linear" in direct_unsupported_reason(model)
    with pytest.raises(ValueError, match="cannot run this model exactly"):
        DirectDecoder(model, 8)
    tokens = greedy(model)
    assert not torch.equal(tokens, base_tokens)  # the adapter (random, nonzero B) changes greedy output
    assert torch.equal(tokens, greedy(model, backend="hf"))


def test_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "PEFT" in direct_unsupported_reason(model)


def test_forward_hook_is_refused_and_honoured():
    model = tiny_qwen2()
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: out * 3.0)
    assert "forward hooks" in direct_unsupported_reason(model)
    tokens = greedy(model)
    assert torch.equal(tokens, greedy(model, backend="hf"))
    handle.remove()
    assert not torch.equal(tokens, greedy(model))  # the hook mattered


def test_parametrised_weight_is_refused():
    model = tiny_qwen2()

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    nn.utils.parametrize.register_parametrization(model.model.layers[1].self_attn.o_proj, "weight", Double())
    assert direct_unsupported_reason(model) is not None


def test_quantised_mixed_dtype_moe_attention_and_rope_variants_are_refused():
    model = tiny_qwen2()
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    assert "quantised" in direct_unsupported_reason(model)

    model = tiny_qwen2()
    model.model.layers[0].mlp.up_proj.weight = nn.Parameter(torch.zeros(128, 64, dtype=torch.int8), requires_grad=False)
    assert "quantised" in direct_unsupported_reason(model)

    model = tiny_qwen2()
    model.model.layers[1].to(torch.bfloat16)
    assert "several dtypes" in direct_unsupported_reason(model)

    model = tiny_qwen2()
    model.config.num_experts = 8
    assert "mixture-of-experts" in direct_unsupported_reason(model)

    model = tiny_qwen2()
    model.config._attn_implementation = "flex_attention"
    assert "attention implementation" in direct_unsupported_reason(model)

    model = tiny_qwen2()
    model.config.partial_rotary_factor = 0.5
    assert "partial rotary" in direct_unsupported_reason(model)


def test_ddp_and_fsdp2_wrappers_are_refused(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ddp = nn.parallel.DistributedDataParallel(tiny_qwen2())
        assert "DistributedDataParallel" in direct_unsupported_reason(ddp)
        from torch.distributed.fsdp import fully_shard

        model = tiny_qwen2()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert "FSDP2" in direct_unsupported_reason(model)
    finally:
        dist.destroy_process_group()


def test_fallback_is_logged_once_per_reason(caplog, monkeypatch):
    monkeypatch.setattr(local_mod, "_FALLBACKS_LOGGED", set())
    model = tiny_qwen2()
    model.model.layers[0].register_forward_hook(lambda m, a, out: None)
    with caplog.at_level(logging.WARNING, logger="gradus.rollout"):
        greedy(model)
        greedy(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "gradus.rollout"]
    assert len(lines) == 1 and "forward hooks" in lines[0] and "own forward" in lines[0]
