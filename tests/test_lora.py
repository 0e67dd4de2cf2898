"""LoRA through PEFT, against public behaviour: a PEFT model computes what its merged copy computes (log-probs,
greedy samples), its reference is its base, training moves only the adapters, a resumed LoRA run equals an
uninterrupted one, and `gradus export` writes a model that plain transformers loads and that computes the
trained policy."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from train.conftest import dies_at, tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradus.cli import main
from gradus.config import ConfigError, load_config
from gradus.logprobs import completion_logprobs
from gradus.models import build_char_tokenizer, build_tiny_model, load_pretrained, lora
from gradus.rollout import LocalEngine, SamplingParams
from gradus.train.checkpoint import latest_checkpoint
from gradus.train.resume import resume_config
from gradus.train.trainer import Trainer


def _nonzero_adapter(seed: int = 0):
    """A nano model with LoRA on every projection and random B matrices: an adapter that changes the model."""
    tokenizer = build_char_tokenizer()
    base = build_tiny_model("nano", tokenizer=tokenizer, seed=0)
    plain = copy.deepcopy(base)
    cfg = load_config(overrides=["model.lora_r=4"]).model
    model = lora.apply_lora(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, plain, tokenizer


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (3, 14), generator=gen)  # [B, S]
    mask = torch.ones_like(ids)  # [B, S]
    mask[0, :3] = 0  # a left-padded row
    return ids, mask


def test_apply_lora_starts_equal_to_the_base_and_trains_only_adapters():
    tokenizer = build_char_tokenizer()
    base = build_tiny_model("nano", tokenizer=tokenizer, seed=0)
    plain = copy.deepcopy(base)
    model = lora.apply_lora(base, load_config(overrides=["model.lora_r=4"]).model)
    ids, mask = _batch()
    # B starts at zero: the adapted model is the base model until trained
    torch.testing.assert_close(completion_logprobs(model, ids, mask, 6), completion_logprobs(plain, ids, mask, 6),
                               rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 7 projections x (A, B)
    assert len(trainable) == 2 * 7 * 2
    completion_logprobs(model, ids, mask, 6).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    # B = 0: only B gets a gradient at first (dL/dA goes through B)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_peft_logprobs_equal_the_merged_models_and_the_reference_is_the_base():
    model, plain, _ = _nonzero_adapter()
    merged = lora.merged_copy(model)
    assert not lora.is_lora(merged)
    ids, mask = _batch()
    adapted = completion_logprobs(model, ids, mask, 6)  # [3, 8]
    torch.testing.assert_close(adapted, completion_logprobs(merged, ids, mask, 6), rtol=0, atol=1e-5)
    base = completion_logprobs(plain, ids, mask, 6)
    assert (adapted - base).abs().max() > 1e-2  # the adapter matters, so the equality above says something
    with lora.reference_mode(model):
        torch.testing.assert_close(completion_logprobs(model, ids, mask, 6), base, rtol=0, atol=1e-6)
    # the context restores the adapter
    torch.testing.assert_close(completion_logprobs(model, ids, mask, 6), adapted, rtol=0, atol=0)


def _greedy(model, tokenizer, prompts):
    engine = LocalEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[])
    return engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=12)).completion_ids


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def test_the_engine_samples_from_the_adapted_weights():
    model, plain, tokenizer = _nonzero_adapter()
    adapted = _greedy(model, tokenizer, PROMPTS)
    assert not torch.equal(adapted, _greedy(plain, tokenizer, PROMPTS))
    assert torch.equal(adapted, _greedy(lora.merged_copy(model), tokenizer, PROMPTS))


def test_the_engine_refuses_its_fast_path_for_injected_adapters():
    """The PEFT wrapper's inner model is a stock Qwen2ForCausalLM class whose q_proj ... are LoRA layers: the fast
    decoder must fall back to the model's forward, or it samples from the base weights."""
    model, _, tokenizer = _nonzero_adapter()
    inner = model.base_model.model
    assert not LocalEngine(inner, pad_token_id=0, eos_token_ids=[]).uses_direct()
    assert torch.equal(_greedy(inner, tokenizer, PROMPTS), _greedy(lora.merged_copy(model), tokenizer, PROMPTS))


def test_a_target_that_matches_nothing_names_the_models_layers():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model("nano", tokenizer=tokenizer)
    cfg = load_config(overrides=["model.lora_r=4", "model.lora_targets=query,value"]).model
    with pytest.raises(ConfigError, match=r"model.lora_targets: 'query' matches no module .*: down_proj, gate_proj, "
                                          r"k_proj, o_proj, q_proj, up_proj, v_proj$"):
        lora.apply_lora(model, cfg)


def _adapted(model) -> set[str]:
    """The modules PEFT put an adapter on, by their name in the plain model (a fused MoE tensor's nested
    wrappers, experts.base_layer..., as their module)."""
    from peft.tuners.lora import LoraLayer

    return {re.sub(r"(\.base_layer)+$", "", name.removeprefix("base_model.model."))
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


PLAN_REFUSED = {  # (arch, targets) -> what the refusal says
    ("qwen2_moe", "all-linear"): r"width of model.layers.0.mlp.shared_expert_gate \(64 -> 1 features: width 1\)",
    ("mixtral", "self_attn.o_proj,down_proj"): r"'down_proj' matches no module",  # Mixtral's experts name it w2
    # PEFT maps all-linear onto the routers too, which routing capture cannot see through (it failed at sampling)
    ("qwen3_moe", "all-linear"): r"adapts the MoE routers \(mlp.gate\), which gradus' routing record",
    ("mixtral", "all-linear"): r"adapts the MoE routers \(mlp.gate\), which gradus' routing record",
}


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen2_moe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("targets", [None, "all-linear", "q_proj,v_proj", "self_attn.o_proj,down_proj"])
def test_the_plan_is_what_peft_adapts_and_the_config_alone_gives_it(arch, targets):
    """plan_lora (what the run's log line and the rank check read) names exactly the modules PEFT adapts in the
    loaded model, and the preflight's plan from the config alone (a meta-device copy) is the same plan."""
    from gradus.config import ModelConfig

    cfg = ModelConfig(lora_r=2, tiny_size="nano", arch=arch, **({"lora_targets": targets} if targets else {}))
    model = build_tiny_model("nano", tokenizer=build_char_tokenizer(), arch=arch)
    if (arch, targets) in PLAN_REFUSED:
        with pytest.raises(ConfigError, match=PLAN_REFUSED[arch, targets]):
            lora.plan_from_config(cfg)
        with pytest.raises(ConfigError, match=PLAN_REFUSED[arch, targets]):
            lora.apply_lora(model, cfg)
        return
    plan = lora.plan_from_config(cfg)
    assert lora.plan_lora(model, cfg) == plan
    modules = dict(model.named_modules())
    planned = {name if name in modules else name.rpartition(".")[0] for name in plan.shapes}
    assert planned == _adapted(lora.apply_lora(model, cfg))
    line = plan.describe()
    assert line.startswith(f"LoRA r=2 adapts {len(plan.shapes)} weight matrices: self_attn.")
    if arch == "qwen2" or arch == "llama":
        assert "MoE" not in line
    elif arch == "mixtral" or (arch == "qwen3_moe" and targets == "q_proj,v_proj") or arch == "qwen2_moe":
        assert "MoE: the routed experts (4 per MoE layer) get no adapter; the routers (mlp.gate) get none" in line
    else:  # Qwen3-MoE's experts take the MLP names gate_proj, up_proj, down_proj
        assert "MoE: the routed experts get adapters on mlp.experts.down_proj" in line


def test_apply_lora_refuses_a_rank_at_a_layers_width_before_allocating_it():
    """The check preflight makes from the config, made again on the loaded model (for a config that skipped it)."""
    from gradus.config import ModelConfig

    model = build_tiny_model("nano", tokenizer=build_char_tokenizer())
    before = sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match=r"model.lora_r=32 is at or above the width of model.layers.0.self_attn."
                                          r"k_proj \(64 -> 32 features: width 32\)"):
        lora.apply_lora(model, ModelConfig(lora_r=32))
    assert sum(p.numel() for p in model.parameters()) == before  # nothing was injected
    assert len(_adapted(lora.apply_lora(model, ModelConfig(lora_r=31)))) == 14


def test_a_yaml_list_of_targets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lora_r: 8\n  lora_targets: [q_proj, v_proj]\n")
    assert load_config(path).model.lora_targets == "q_proj,v_proj"


# ---- the trainer ------------------------------------------------------------------------------------

def _lora_run(nano_dir, tmp_path, rewards, **extra):
    return tiny_overrides(nano_dir, tmp_path, **{"model.lora_r": 4, "optim.lr": 1e-2, "task.rewards": rewards, **extra})


def test_trainer_reference_is_the_policy_with_its_adapter_off(nano_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=_lora_run(nano_dir, tmp_path, signal_reward, **{"algo.kl_coef": 0.1})))
    assert lora.is_lora(trainer.policy)
    with trainer.actor.reference() as reference:
        assert reference is trainer.policy  # no second copy in memory
    optimized = {id(p) for group in trainer.actor.optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for n, p in trainer.policy.named_parameters() if "lora_" in n}
    assert optimized == adapters
    base = [p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n]
    trainer.fit()
    after = [p for n, p in trainer.policy.named_parameters() if "lora_" not in n]
    assert all(torch.equal(a, b) for a, b in zip(base, after, strict=True))  # the base weights are frozen
    assert any(p.abs().sum() > 0 for n, p in trainer.policy.named_parameters() if "lora_B" in n)  # adapters moved
    # the reference log-probs `prepare` computes are the initial model's, though the adapter has moved
    from gradus.train.generation import collect

    got = collect(trainer.engine, trainer.source, trainer.rollout, trainer.params, trainer.algo,
                  num_groups=2, group_size=4, seed=1)
    inputs = trainer.prepare(got, {}, minibatches=1)
    initial, _ = load_pretrained(nano_dir)
    b = got.batch
    expected = completion_logprobs(initial, b.input_ids, b.attention_mask, b.completion_start) * b.completion_mask
    torch.testing.assert_close(inputs.ref_logp[:, : expected.shape[1]], expected, rtol=0, atol=1e-5)
    adapted = completion_logprobs(trainer.policy, b.input_ids, b.attention_mask, b.completion_start)
    assert ((adapted - expected).abs() * b.completion_mask).max() > 1e-4  # the two differ after training


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_of_a_lora_run_equals_an_uninterrupted_one(algo, nano_dir, tmp_path, monkeypatch, signal_reward):
    extra = {"algo.name": algo, "run.save_every": 1, "optim.minibatches": 2}
    straight = Trainer(load_config(overrides=_lora_run(nano_dir, tmp_path / "a", signal_reward, **extra)))
    straight.fit()

    killed = Trainer(load_config(overrides=_lora_run(nano_dir, tmp_path / "b", signal_reward, **extra)))
    with dies_at(monkeypatch, 2):
        killed.fit()
    ckpt = latest_checkpoint(killed.run_dir)
    assert ckpt.name == "step-000001"
    policy = ckpt / "policy"
    assert (policy / "adapter_model.safetensors").is_file() and not (policy / "model.safetensors").exists()
    assert lora.adapter_base(policy) == nano_dir.absolute()

    resumed = Trainer(resume_config(killed.run_dir, []), run_dir=killed.run_dir, resume=True)
    assert resumed.step == 1 and lora.is_lora(resumed.policy)
    resumed.fit()
    names = [n for n, _ in straight.policy.named_parameters()]
    assert names == [n for n, _ in resumed.policy.named_parameters()]
    for name, a, b in zip(names, _params(straight.policy), _params(resumed.policy), strict=True):
        assert torch.equal(a, b), name
    initial = _params(lora.apply_lora(load_pretrained(nano_dir)[0], resumed.cfg.model))
    assert any(not torch.equal(a, b) for a, b in zip(initial, _params(resumed.policy), strict=True) if a.dim())
    if algo == "ppo":
        assert not lora.is_lora(resumed.critic.model)  # the critic is trained in full
        for a, b in zip(_params(straight.critic.model), _params(resumed.critic.model), strict=True):
            assert torch.equal(a, b)


def test_lora_keys_cannot_change_on_resume(nano_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=_lora_run(nano_dir, tmp_path, signal_reward, **{"run.steps": 1,
                                                                                            "run.name": "r"})))
    trainer.fit()
    with pytest.raises(ConfigError, match="model.lora_r"):
        resume_config(trainer.run_dir, ["model.lora_r=8", "run.steps=2"])


# ---- export and loading a LoRA run -------------------------------------------------------------------

def test_export_writes_the_merged_policy_that_transformers_loads(nano_dir, tmp_path, capsys, signal_reward):
    trainer = Trainer(load_config(overrides=_lora_run(nano_dir, tmp_path, signal_reward, **{"run.steps": 1,
                                                                                            "run.name": "r"})))
    trainer.fit()
    out = tmp_path / "exported"
    assert main(["export", str(trainer.run_dir), "--out", str(out)]) == 0
    assert "merged the LoRA adapter" in capsys.readouterr().err
    assert not any(p.name.startswith(".exported") for p in tmp_path.iterdir())  # no temporary folder left
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, nothing else
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not lora.is_lora(model) and tokenizer.pad_token_id == trainer.tokenizer.pad_token_id
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids, mask = _batch()
    trainer.policy.eval()
    expected = completion_logprobs(trainer.policy, ids, mask, 6)
    initial = completion_logprobs(load_pretrained(nano_dir)[0], ids, mask, 6)
    assert (expected - initial).abs().max() > 1e-4  # training moved the adapter: the export carries it
    torch.testing.assert_close(completion_logprobs(model, ids, mask, 6), expected, rtol=0, atol=1e-5)
    # the checkpoint's policy is a standard PEFT adapter folder
    from peft import AutoPeftModelForCausalLM

    peft_loaded = AutoPeftModelForCausalLM.from_pretrained(latest_checkpoint(trainer.run_dir) / "policy")
    torch.testing.assert_close(completion_logprobs(peft_loaded, ids, mask, 6), expected, rtol=0, atol=1e-5)
    # `--model RUN` (eval, train) loads the same merged policy
    from gradus.train import bootstrap

    path, _ = bootstrap.resolve_model_dir(trainer.run_dir)
    loaded, _ = lora.load_model(path, trainer.cfg.model.dtype, torch.device("cpu"))
    torch.testing.assert_close(completion_logprobs(loaded, ids, mask, 6), expected, rtol=0, atol=1e-5)
    assert main(["eval", "--model", str(trainer.run_dir), "--n", "4", "--k", "0", "--json", "--no-progress",
                 "rollout.max_new_tokens=6"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4


def test_export_of_a_full_run_copies_its_policy(nano_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{"run.steps": 1,
                                                                                  "task.rewards": signal_reward})))
    trainer.fit()
    out = tmp_path / "exported"
    assert main(["export", str(latest_checkpoint(trainer.run_dir)), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(trainer.policy.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach()), name
    initial = load_pretrained(nano_dir)[0]
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), model.parameters(), strict=True))


def test_export_names_a_bad_source_or_destination(nano_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["export", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"export error: {missing} does not exist" in capsys.readouterr().err
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    assert main(["export", str(empty_run), "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    assert main(["export", str(nano_dir), "--out", str(taken)]) == 2
    assert f"--out {taken} already exists" in capsys.readouterr().err
    assert (taken / "x").read_text() == "mine"
    # an adapter whose base model is gone
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert main(["export", str(adapter), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "gone") in err and "does not exist" in err
    assert not (tmp_path / "o").exists()
