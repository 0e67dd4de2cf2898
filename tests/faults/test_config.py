"""Config values that would run and quietly do harm, or fail only after minutes of warm start:
each is refused before any work, with the field, its value and what is allowed named.

`no_work` makes every warm start and model load fail the test, so "refused before any work" is
checked, not assumed.
"""

import dataclasses
import importlib.util
import json

import pytest
import yaml

from gradus.algorithm import resolve_algo
from gradus.cli import main
from gradus.config import ConfigError, load_config
from gradus.models import build_char_tokenizer, build_tiny_model, lora, save_pretrained
from gradus.objectives import ALGORITHMS
from gradus.train import bootstrap, sft
from gradus.train.resume import resume_config
from gradus.train.trainer import Trainer


@pytest.fixture
def no_work(monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError("a warm start or model load ran before the config was checked")

    for module, name in ((bootstrap, "tiny_model_dir"), (bootstrap, "run_sft"), (lora, "load_model"),
                         (sft, "run_sft")):
        monkeypatch.setattr(module, name, work)


def _refused(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "config error" in err
    for word in words:
        assert word in err, err
    return err


HARMFUL = [  # (override, field, what the message must show of the value)
    ("optim.grad_clip=-1", "optim.grad_clip", "-1"),  # would negate the gradient
    ("optim.grad_clip=0", "optim.grad_clip", "0"),
    ("optim.grad_clip=nan", "optim.grad_clip", "nan"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints", "0"),  # would delete every checkpoint, final model too
    ("algo.clip_high=nan", "algo.clip_high", "nan"),
    ("algo.kl_coef=nan", "algo.kl_coef", "nan"),
    ("task.rewards=countdown:nan", "task.rewards", "nan"),
    ("optim.lr=inf", "optim.lr", "inf"),
    ("optim.lr=-1e-4", "optim.lr", "-0.0001"),
    ("sft.steps=-1", "sft.steps", "-1"),
    ("model.chunk_size=0", "model.chunk_size", "0"),
    ("sft.batch_size=0", "sft.batch_size", "0"),
    ("model.dtype=float16", "model.dtype", "float16"),  # was only checked after the warm start
    ("rollout.top_p=0", "rollout.top_p", "0"),
    ("algo.name=ppo algo.gamma=2", "algo.gamma", "2"),
    ("algo.name=ppo algo.lam=-1", "algo.lam", "-1"),
    ("algo.name=ppo algo.critic_lr=-1", "algo.critic_lr", "-1"),
    # a correction band without ratio 1 zeroes every on-policy token: the run would learn nothing
    ("algo.rollout_correction=icepop algo.correction_low=1.5 algo.correction_high=1.5", "algo.correction_low",
     "[1.5, 1.5]"),
    ("algo.rollout_correction=mis algo.correction_high=0.9", "algo.correction_high", "0.9"),
    ("algo.rollout_correction=tis algo.correction_high=0.5", "algo.correction_high", "0.5"),  # shrinks every token
    ("algo.name=dppo_tv algo.ratio_cap=0.5", "algo.ratio_cap", "0.5"),  # would shrink every on-policy token too
]


REJECTION_FAULTS = [  # (overrides, words the message must hold): each would drop every token, or is ambiguous
    ("algo.rollout_rejection=token_k1 algo.rejection_thresholds=1.5_2",
     ("algo.rollout_rejection=token_k1", "low <= 1 <= high", "on-policy token", "algo.rejection_thresholds")),
    ("algo.rollout_rejection=seq_mean_k3 algo.rejection_thresholds=0",
     ("algo.rollout_rejection", "upper bound must be positive")),
    ("algo.rollout_rejection=token_k2", ("token_k2 has no default threshold", "algo.rejection_thresholds")),
    ("algo.rollout_rejection=seq_max_k1", ("unknown rejection criterion 'seq_max_k1'", "valid: token_k1")),
    ("algo.rollout_rejection=token_k1,token_k2 algo.rejection_thresholds=2,0.1,0.2",
     ("3 thresholds for 2 rejection criteria",)),
    ("algo.rejection_thresholds=0.1", ("algo.rollout_rejection", "without a rejection criterion")),
    ("algo.name=clip_cov algo.cov_low=5 algo.cov_high=1", ("cov_low (5.0) must be below cov_high (1.0)",)),
    ("algo.name=grpo algo.cov_frac=0.1", ("algo.cov_frac is not used by algo 'grpo'",)),
    ("algo.name=reinforce_pp algo.lam=0.5", ("algo.lam is not used by the reinforce_pp advantage estimator", "gae")),
]


@pytest.mark.parametrize(("overrides", "words"), REJECTION_FAULTS)
def test_rejection_and_new_knobs_that_cannot_work_are_refused_before_any_work(overrides, words, tmp_path, capsys,
                                                                               no_work):
    _refused(["train", *overrides.split(), f"run.out_dir={tmp_path}", f"run.cache_dir={tmp_path}"], capsys, *words)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("overrides", "field", "value"), HARMFUL)
def test_train_refuses_a_harmful_value_before_any_work(overrides, field, value, tmp_path, capsys, no_work):
    err = _refused(["train", *overrides.split(), f"run.out_dir={tmp_path}", f"run.cache_dir={tmp_path}"],
                   capsys, field, value)
    assert not any(tmp_path.iterdir())  # not even a run folder
    if field != "task.rewards":
        assert "must be" in err  # the allowed range is named


@pytest.mark.parametrize(("overrides", "field"), [("sft.batch_size=0", "sft.batch_size"),
                                                  ("sft.lr=nan", "sft.lr"), ("model.dtype=fp16", "model.dtype")])
def test_sft_refuses_before_the_warm_start(overrides, field, tmp_path, capsys, no_work):
    _refused(["sft", "--output", str(tmp_path / "out"), overrides, f"run.cache_dir={tmp_path}"], capsys, field)


LORA_FAULTS = [  # (overrides, words the message must hold)
    ("model.lora_r=-1", ("model.lora_r", "-1", "must be >= 0")),
    ("model.lora_r=8 model.lora_alpha=0", ("model.lora_alpha", "must be > 0")),
    ("model.lora_r=8 model.lora_dropout=1", ("model.lora_dropout", "must be in [0, 1)")),
    ("model.lora_r=8 model.lora_targets=q_proj;v_proj", ("model.lora_targets", "comma-separated module names")),
    ("model.lora_r=8 model.lora_targets=", ("model.lora_targets", "at least one module")),
    # the log-prob path reads the plain lm head; a merged embedding adapter would also move a tied lm head
    ("model.lora_r=8 model.lora_targets=q_proj,lm_head", ("'lm_head' is the lm head", "log-probs")),
    ("model.lora_r=8 model.lora_targets=model.embed_tokens", ("'model.embed_tokens' is the token embedding",
                                                             "exported model")),
    # a LoRA knob without a LoRA rank would be ignored
    ("model.lora_alpha=16", ("model.lora_alpha", "only used with LoRA", "model.lora_r=0")),
    ("model.lora_targets=q_proj", ("model.lora_targets", "only used with LoRA")),
]


@pytest.mark.parametrize(("overrides", "words"), LORA_FAULTS)
def test_lora_fields_that_cannot_work_are_refused_before_any_work(overrides, words, tmp_path, capsys, no_work):
    _refused(["train", *overrides.split(), f"run.out_dir={tmp_path}", f"run.cache_dir={tmp_path}"], capsys, *words)
    assert not any(tmp_path.iterdir())


# a rank at or above a layer's width (min(in, out)): 100000 on nano trained 50 s and wrote a 2.8 GB checkpoint
LORA_RANKS = [  # (model: None for the built-in one, overrides, words the message must hold)
    (None, "model.tiny_size=nano model.lora_r=100000", ("model.lora_r=100000 is at or above the width of "
                                                      "model.layers.0.self_attn.k_proj (64 -> 32 features: width 32)",
                                                      "set model.lora_r below 32")),
    ("nano", "model.lora_r=64 model.lora_targets=q_proj,o_proj", ("model.lora_r=64", "self_attn.q_proj (64 -> 64",
                                                                   "below 64")),
    ("nano", "model.lora_r=32", ("model.lora_r=32", "self_attn.k_proj (64 -> 32 features: width 32)")),
]


@pytest.mark.parametrize(("model", "overrides", "words"), LORA_RANKS)
def test_a_lora_rank_at_a_layers_width_is_refused_before_the_model_is_loaded(model, overrides, words, nano_dir,
                                                                             tmp_path, capsys, no_work):
    given = [f"model.path={nano_dir}"] if model else []
    _refused(["train", *given, *overrides.split(), f"run.out_dir={tmp_path}", f"run.cache_dir={tmp_path}"],
             capsys, *words)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("targets", "unmatched"), [("q_proj,foo_proj", "foo_proj"), ("foo_proj,v_proj", "foo_proj"),
                                                    ("q_proj,w1,w3", "w1")])
def test_a_lora_target_that_matches_nothing_is_an_error_even_when_another_matches(targets, unmatched, nano_dir,
                                                                                  tmp_path, capsys, no_work):
    """PEFT drops a name that matches nothing when another one matches: the run trained fewer layers than asked."""
    err = _refused(["train", f"model.path={nano_dir}", "model.lora_r=4", f"model.lora_targets={targets}",
                    f"run.out_dir={tmp_path}"], capsys)
    assert err.strip() == (f"gradus: config error: model.lora_targets: {unmatched!r} matches no module of the "
                           "model; name linear layers, which are here: down_proj, gate_proj, k_proj, o_proj, q_proj, "
                           "up_proj, v_proj")


@pytest.mark.parametrize(("arch", "says"), [
    ("qwen2", "LoRA r=4 adapts 14 weight matrices: self_attn.q_proj x2, self_attn.k_proj x2, self_attn.v_proj x2, "
              "self_attn.o_proj x2, mlp.gate_proj x2, mlp.up_proj x2, mlp.down_proj x2"),
    # Mixtral: the default targets adapt attention only (its MLP is routed experts, named w1/w2/w3 in PEFT's mapping)
    ("mixtral", "LoRA r=4 adapts 8 weight matrices: self_attn.q_proj x2, self_attn.k_proj x2, self_attn.v_proj x2, "
                "self_attn.o_proj x2; the default targets gate_proj, up_proj, down_proj are not in this model; MoE: "
                "the routed experts (4 per MoE layer) get no adapter; the routers (mlp.gate) get none"),
    # Qwen3-MoE: PEFT maps gate_proj, up_proj, down_proj onto the fused expert tensors
    ("qwen3_moe", "LoRA r=4 adapts 12 weight matrices: self_attn.q_proj x2, self_attn.k_proj x2, self_attn.v_proj x2, "
                  "self_attn.o_proj x2, mlp.experts.down_proj x2, mlp.experts.gate_up_proj x2; MoE: the routed "
                  "experts get adapters on mlp.experts.down_proj, mlp.experts.gate_up_proj (one per expert, 4 per MoE "
                  "layer); the routers (mlp.gate) get none"),
    # Qwen2-MoE: the shared expert is a plain MLP; the routed experts are not adapted
    ("qwen2_moe", "LoRA r=4 adapts 14 weight matrices: self_attn.q_proj x2, self_attn.k_proj x2, self_attn.v_proj x2, "
                  "self_attn.o_proj x2, mlp.shared_expert.gate_proj x2, mlp.shared_expert.up_proj x2, "
                  "mlp.shared_expert.down_proj x2; MoE: the routed experts (4 per MoE layer) get no adapter; the "
                  "routers (mlp.gate) get none; the shared experts' 6 matrices are adapted"),
])
def test_the_log_says_which_modules_lora_adapts_before_any_work(arch, says, tmp_path, capsys, no_work):
    model = tmp_path / arch
    tokenizer = build_char_tokenizer()
    save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, arch=arch), tokenizer, model)
    cfg = load_config(overrides=[f"model.path={model}", "model.lora_r=4", "task.name=arithmetic",
                                 "task.heldout_size=8", f"run.out_dir={tmp_path / 'runs'}"])
    bootstrap.preflight(cfg)
    assert f"gradus: {says}\n" in capsys.readouterr().err


@pytest.mark.parametrize(("arch", "targets"), [("mixtral", "all-linear"), ("qwen3_moe", "all-linear"),
                                             ("mixtral", "q_proj,gate")])
def test_lora_on_an_moe_router_is_refused_before_loading(arch, targets, tmp_path, capsys, no_work):
    """PEFT maps these onto the routers, and wraps them: the first sampling failed with a traceback from routing
    capture ("router saw 24 tokens but its block's input was (24, 64)")."""
    model = tmp_path / arch
    tokenizer = build_char_tokenizer()
    save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, arch=arch), tokenizer, model)
    err = _refused(["train", f"model.path={model}", "model.lora_r=2", f"model.lora_targets={targets}",
                    f"run.out_dir={tmp_path / 'runs'}"], capsys)
    assert f"model.lora_targets={targets!r} adapts the MoE routers (mlp.gate)" in err
    assert "list the targets without 'gate' (all-linear includes it)" in err
    assert not (tmp_path / "runs").exists()


def test_eval_refuses_before_loading_the_model(tmp_path, capsys, no_work):
    _refused(["eval", "--model", str(tmp_path), "model.chunk_size=0"], capsys, "model.chunk_size")


def test_compare_checks_every_run_before_the_first(tmp_path, capsys, no_work):
    _refused(["compare", "--algos", "grpo,dapo", "--out", str(tmp_path / "cmp"), "optim.grad_clip=-1"],
             capsys, "optim.grad_clip")
    assert not (tmp_path / "cmp").exists()


def test_resume_checks_the_saved_config(tmp_path, capsys, no_work):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"optim": {"grad_clip": -1.0}}))
    _refused(["train", "--resume", str(tmp_path)], capsys, "optim.grad_clip", "-1")


def test_completion_past_the_tiny_models_positions_is_refused_before_the_warm_start(tmp_path, capsys, no_work):
    _refused(["train", "rollout.max_new_tokens=600", "task.heldout_size=8", f"run.out_dir={tmp_path}",
              f"run.cache_dir={tmp_path}"], capsys, "rollout.max_new_tokens", "512")


def test_completion_past_a_user_models_positions_is_refused_before_loading_it(tmp_path, capsys, no_work):
    model = tmp_path / "model"
    tokenizer = build_char_tokenizer()
    save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, max_positions=32), tokenizer, model)
    assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == 32
    err = _refused(["train", "--model", str(model), "--task", "arithmetic", "rollout.max_new_tokens=30",
                    "task.heldout_size=8", f"run.out_dir={tmp_path / 'runs'}"], capsys, "rollout.max_new_tokens")
    assert "32 positions" in err


@pytest.mark.parametrize(("device", "cuda_devices", "words"), [
    ("mps", 0, "MPS is not available"),
    ("cuda:3", 1, "1 CUDA device(s)"),  # was: a traceback from the first .to(device), after the run folder
])
def test_a_device_this_machine_lacks_is_refused_before_any_work(device, cuda_devices, words, tmp_path, capsys,
                                                                monkeypatch, no_work):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if cuda_devices:  # pretend to be a one-GPU machine
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    _refused(["train", f"run.device={device}", f"run.out_dir={tmp_path}", f"run.cache_dir={tmp_path}"],
             capsys, "run.device", words)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("setting", "words"), [
    ("algo.routing_replay=r3", ("algo.routing_replay=r3 needs a mixture-of-experts policy", "model.arch=qwen2")),
    ("model.router_aux_coef=0.1", ("model.router_aux_coef=0.1", "model.arch=qwen2 has no router")),
])
def test_moe_settings_on_the_dense_built_in_model_are_refused_before_the_warm_start(setting, words, tmp_path, capsys,
                                                                                    no_work):
    # was: refused only once the model was loaded, after a warm start (47 s with an empty cache)
    _refused(["train", setting, f"run.out_dir={tmp_path}", f"run.cache_dir={tmp_path}"], capsys, *words)
    assert not any(tmp_path.iterdir())


def test_moe_settings_on_a_dense_model_folder_are_refused_before_loading_it(nano_dir, tmp_path, capsys, no_work):
    _refused(["train", "--model", str(nano_dir), "algo.routing_replay=r3", f"run.out_dir={tmp_path}"], capsys,
             "algo.routing_replay=r3 needs a mixture-of-experts policy", "config.json")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (the README's test command installs it)")
def test_vllm_positions_too_short_for_prompt_and_completion_are_refused_before_any_work(tmp_path, capsys, no_work):
    # was: a ValueError traceback from the engine at the first evaluation, after the warm start
    err = _refused(["train", "rollout.engine=vllm", "vllm.max_model_len=20", f"run.out_dir={tmp_path}",
                    f"run.cache_dir={tmp_path}"], capsys, "rollout.max_new_tokens=16", "vllm.max_model_len=20")
    assert "rollout.max_new_tokens must be <=" in err
    assert not any(tmp_path.iterdir())


def test_compare_checks_the_task_data_before_the_first_run(tmp_path, capsys, no_work):
    _refused(["compare", "--algos", "grpo,dapo", "--out", str(tmp_path / "cmp"), "task.name=file",
              f"task.data_file={tmp_path / 'missing.jsonl'}"], capsys, "missing.jsonl")
    assert not (tmp_path / "cmp").exists()  # was: every run failed in turn, then an empty report


def _long_heldout_file(tmp_path):
    """Five distinct prompts hold out one, a long one (the split is seeded): skipping the rows too long for a
    model of 512 positions or fewer leaves one to train on and none to evaluate on."""
    rows = [{"question": "long " * 120 + str(i), "answer": str(i)} for i in range(4)] + [{"question": "0+0",
                                                                                          "answer": "0"}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return data


def test_a_file_whose_heldout_rows_are_all_skipped_is_refused_before_the_warm_start(tmp_path, capsys, no_work):
    _refused(["train", "--data", str(_long_heldout_file(tmp_path)), "task.on_error=skip",
              f"run.out_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path}"],
             capsys, "the held-out set is empty", "0 held out")  # was: after the warm start and the model load
    assert not (tmp_path / "runs").exists()


def test_eval_of_an_empty_heldout_set_is_refused_before_loading_the_model(tmp_path, capsys, no_work):
    tokenizer = build_char_tokenizer()
    model = save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, max_positions=64), tokenizer,
                            tmp_path / "model")
    _refused(["eval", "--model", str(model), "--data", str(_long_heldout_file(tmp_path)), "task.on_error=skip"],
             capsys, "the held-out set is empty")  # was: n=0 accuracy=0.000 after loading the model


@pytest.mark.parametrize("override", ["run.steps=inf", "run.steps=1e400"])
def test_an_infinite_count_is_a_config_error_not_a_traceback(override, capsys, no_work):
    _refused(["train", override], capsys, "run.steps must be int")


def test_yaml_true_is_not_the_number_one(tmp_path, capsys, no_work):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: true\n")
    _refused(["train", "--config", str(path)], capsys, str(path), "optim.lr must be float")


# ---- YAML and keys ------------------------------------------------------------------------------

def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("algo:\n  name: grpo\n   clip_high: 0.3\n")
    _refused(["train", "--config", str(path)], capsys, str(path), "line 3")


def test_non_utf8_yaml_names_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: café\n".encode("latin-1"))
    _refused(["train", "--config", str(path)], capsys, str(path), "UTF-8")


def test_a_section_given_a_value_suggests_its_key(tmp_path, capsys):
    _refused(["train", "algo=grpo"], capsys, "section", "algo.name=grpo")
    path = tmp_path / "c.yaml"
    path.write_text("algo: dapo\n")
    _refused(["train", "--config", str(path)], capsys, str(path), "algo.name=dapo")


@pytest.mark.parametrize(("key", "meant"), [
    ("optim.learning_rate", "optim.lr"), ("learning_rate", "optim.lr"), ("sft.learning_rate", "sft.lr"),
    ("num_generations", "rollout.group_size"), ("algo.beta", "algo.kl_coef"), ("num_iterations", "optim.epochs"),
    ("max_completion_length", "rollout.max_new_tokens"), ("max_steps", "run.steps"),
])
def test_did_you_mean_by_meaning_then_spelling(key, meant):
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        load_config(overrides=[f"{key}=1"])


@pytest.mark.parametrize("key", ["algo.foo", "algo.bar", "optim.xyz"])
def test_nothing_close_suggests_nothing(key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}=1"])
    assert "did you mean" not in str(err.value)


def test_help_config_shows_defaults_and_the_presets_values(capsys):
    assert main(["train", "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lr = next(line for line in lines if line.startswith("optim.lr "))
    assert "0.0002" in lr and "> 0" in lr
    at = next(i for i, line in enumerate(lines) if line.startswith("algo.clip_high "))
    assert "None" in lines[at] and "0.28 (dapo)" in lines[at + 1]


# ---- the saved config is the resolved one ---------------------------------------------------------

@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_resolved_config_resolves_to_the_same_algorithm(algo, tmp_path):
    from gradus.algorithm import resolved_config
    from gradus.config import save_config

    cfg = load_config(overrides=[f"algo.name={algo}", "rollout.max_new_tokens=12"])
    save_config(resolved_config(cfg), tmp_path / "config.yaml")
    saved = load_config(tmp_path / "config.yaml")
    assert resolve_algo(saved) == resolve_algo(cfg)
    assert saved.optim.epochs is not None and saved.algo.kl_coef is not None


def test_a_resumed_run_may_change_its_rollout_correction(tmp_path):
    # the resolved config saved tis's default cap (2.0); resuming with none was refused, and with icepop it
    # silently kept [.., 2] instead of icepop's [0.5, 5]
    from gradus.algorithm import resolved_config
    from gradus.config import save_config

    save_config(resolved_config(load_config(overrides=["algo.rollout_correction=tis"])), tmp_path / "config.yaml")
    assert resolve_algo(load_config(tmp_path / "config.yaml", ["algo.rollout_correction=none"])).correction == "none"
    icepop = resolve_algo(load_config(tmp_path / "config.yaml", ["algo.rollout_correction=icepop"]))
    assert icepop.correction_bounds == (0.5, 5.0)


def test_run_saves_the_resolved_config_and_resumes_from_it(tmp_path, signal_reward):
    tokenizer = build_char_tokenizer()
    model = save_pretrained(build_tiny_model("nano", tokenizer=tokenizer), tokenizer, tmp_path / "nano")
    overrides = [f"model.path={model}", f"run.out_dir={tmp_path}", "run.name=r", "run.progress=false",
                 "run.steps=1", "run.eval_every=0", "run.save_every=1", "task.heldout_size=4", "task.name=arithmetic",
                 "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "algo.name=dapo",
                 f"task.rewards={signal_reward}"]  # groups that differ: the run learns
    trainer = Trainer(load_config(overrides=overrides))
    trainer.fit()
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["algo"]["clip_high"] == 0.28 and saved["algo"]["clip_low"] == 0.2
    assert saved["algo"]["kl_coef"] == 0.0 and saved["algo"]["dynamic_sampling"] is True
    assert saved["optim"]["epochs"] == 1 and saved["optim"]["minibatches"] == 1 and saved["run"]["steps"] == 1
    resumed = Trainer(resume_config(tmp_path / "r", ["run.steps=2"]), run_dir=tmp_path / "r", resume=True)
    assert resumed.step == 1 and resumed.algo == dataclasses.replace(trainer.algo, steps=2)
    resumed.fit()
    assert resumed.step == 2


# ---- the warm start's cache key -----------------------------------------------------------------

def test_warm_start_cache_changes_with_the_data_files_content(tmp_path, monkeypatch):
    monkeypatch.setattr(bootstrap, "run_sft", lambda *a, **k: {"sft/loss": 0.0})
    data = tmp_path / "data.jsonl"
    overrides = ["task.name=file", f"task.data_file={data}", "model.tiny_size=nano", f"run.cache_dir={tmp_path}"]
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(30)))
    first = bootstrap.tiny_model_dir(load_config(overrides=overrides), progress=False)
    data.write_text("".join(json.dumps({"question": f"{i}*2=", "answer": str(2 * i)}) + "\n" for i in range(30)))
    second = bootstrap.tiny_model_dir(load_config(overrides=overrides), progress=False)
    assert first != second
    third = bootstrap.tiny_model_dir(load_config(overrides=[*overrides, "task.template=Q: {prompt}"]),
                                     progress=False)
    assert third not in (first, second)
    # the default task's key did not change form, so users' existing warm starts still hit (this digest is
    # the one of the default config made with the 300 SFT steps of gradus before its warm start was shortened to 250)
    cached = tmp_path / "tiny-micro-countdown-5aa697940e4743c0"
    cached.mkdir()
    (cached / "gradus_sft.json").write_text("{}")
    old_default = load_config(overrides=[f"run.cache_dir={tmp_path}", "sft.steps=300"])
    assert bootstrap.tiny_model_dir(old_default, progress=False) == cached


def test_algorithm_rules_do_not_stop_eval_or_sft(nano_dir, tmp_path, capsys):
    # The default algorithm (DAPO) shapes the last algo.overlong_cache=4 tokens of a completion, so a
    # 2-token budget is an error for training; eval and sft run no RL step and must not refuse it.
    assert main(["train", "rollout.max_new_tokens=2"]) == 2
    assert "algo.overlong_cache must be in 1..rollout.max_new_tokens (2)" in capsys.readouterr().err
    assert main(["eval", "--model", str(nano_dir), "--task", "arithmetic", "--n", "2", "--json",
                 "rollout.max_new_tokens=2", "optim.minibatches=3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2
    assert main(["sft", "--model", str(nano_dir), "--output", str(tmp_path / "sft"), "--no-progress",
                 "sft.steps=1", "sft.batch_size=2", "sft.warmup_steps=1", "rollout.max_new_tokens=2"]) == 0
    # field-level checks still apply to every command
    assert main(["eval", "--model", str(nano_dir), "algo.clip_low=-1"]) == 2
