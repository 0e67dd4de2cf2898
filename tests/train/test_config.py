import dataclasses

import pytest

from gradus.algorithm import resolve_algo, resolved_config
from gradus.config import ConfigError, all_keys, field_doc, load_config
from gradus.config_checks import validate
from gradus.objectives import ALGORITHMS, ESTIMATORS


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  name: dapo\n  clip_high: 0.3\nrun:\n  steps: 7\n")
    cfg = load_config(path, ["run.steps=9", "algo.dynamic_sampling=false"])
    assert (cfg.algo.name, cfg.algo.clip_high, cfg.run.steps, cfg.algo.dynamic_sampling) == ("dapo", 0.3, 9, False)
    default = load_config()  # the defaults measured in docs/training.md ("The default run")
    assert (default.algo.name, default.rollout.prompts_per_step, default.rollout.group_size, default.run.steps,
            default.optim.lr, default.sft.steps) == ("dapo", 16, 8, None, 2e-4, 250)
    assert resolve_algo(default).steps == 1000  # None: the preset's


@pytest.mark.parametrize(("algo", "steps"), [("dapo", 1000), ("ppo", 1000), ("grpo", 1500), ("gspo", 1500),
                                             ("sapo", 1500), ("dr_grpo", 1500), ("cispo", 1500)])
def test_steps_are_the_presets_unless_given(algo, steps):
    # measured in docs/training.md: the group-advantage algorithms without dynamic sampling need more steps
    assert resolve_algo(load_config(overrides=[f"algo.name={algo}"])).steps == steps
    given = load_config(overrides=[f"algo.name={algo}", "run.steps=7"])
    assert resolve_algo(given).steps == 7
    assert resolved_config(given).run.steps == 7
    assert resolved_config(load_config(overrides=[f"algo.name={algo}"])).run.steps == steps  # config.yaml says it


@pytest.mark.parametrize(("override", "message"), [
    ("algo.clip_hihg=0.3", "did you mean 'algo.clip_high'"),
    ("clip_high=0.3", "did you mean 'algo.clip_high'"),
    ("run.stepz=3", "did you mean 'run.steps'"),
    ("optim.lr=fast", "optim.lr must be float"),
    ("run.steps=2.5", "run.steps must be int"),
    ("run.steps", "must look like section.key=value"),
])
def test_bad_keys_and_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_every_key_is_documented():
    assert all(field_doc(k) for k in all_keys()), [k for k in all_keys() if not field_doc(k)]


@pytest.mark.parametrize(("overrides", "field"), [
    (["rollout.group_size=1"], "rollout.group_size"),
    (["rollout.prompts_per_step=3", "rollout.group_size=3", "optim.minibatches=2"], "optim.minibatches"),
    (["algo.name=sapo", "algo.clip_high=0.3"], "algo.clip_high"),
    (["algo.name=grpo", "algo.tau_pos=2"], "algo.tau_pos"),
    (["algo.name=gspo", "algo.dual_clip=3"], "algo.dual_clip"),
    (["algo.name=grpo", "algo.gamma=0.9"], "algo.gamma"),
    (["algo.name=ppo", "algo.adv_scale=group"], "algo.adv_scale"),
    (["algo.name=trpo"], "algo.name"),
    (["algo.name=ppo", "algo.kl_estimator=k4"], "algo.kl_estimator"),
    (["algo.name=grpo", "algo.overlong_cache=8"], "algo.overlong_cache"),
    (["rollout.temperature=0"], "rollout.temperature"),
    (["optim.epochs=0"], "optim.epochs"),
])
def test_config_that_cannot_work_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(load_config(overrides=overrides))


def test_presets_papers_defaults():
    grpo = resolve_algo(load_config(overrides=["algo.name=grpo"]))
    assert grpo.kl_coef == 0.04 and grpo.adv_scale == "group" and not grpo.dynamic_sampling
    assert grpo.kl_estimator == "k3"  # GRPO paper: the unbiased non-negative estimator in the loss
    dapo = resolve_algo(load_config(overrides=["algo.name=dapo"]))
    assert dapo.kl_coef == 0 and dapo.dynamic_sampling and dapo.overlong_shaping
    assert (dapo.objective.clip_low, dapo.objective.clip_high) == (0.2, 0.28)
    ppo = resolve_algo(load_config(overrides=["algo.name=ppo"]))
    assert ppo.uses_critic and ppo.kl_in_reward
    assert ppo.kl_estimator == "k1"  # NOTES: per-token reward -beta * (log pi - log pi_ref)
    assert resolve_algo(load_config(overrides=["algo.name=ppo", "algo.kl_estimator=k3"])).kl_estimator == "k3"
    dr = resolve_algo(load_config(overrides=["algo.name=dr_grpo", "rollout.max_new_tokens=32"]))
    assert dr.adv_scale == "none" and dr.objective.agg_norm == 32.0
    assert set(ALGORITHMS) == {"ppo", "grpo", "dapo", "gspo", "gspo_token", "sapo", "dr_grpo", "cispo", "gmpo",
                               "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "gdpo", "rloo", "reinforce_pp",
                               "reinforce_pp_baseline", "grpo_passk"}


def test_every_field_declares_its_valid_values():
    from gradus.config import allowed

    for key in all_keys():
        rule = allowed(key)  # KeyError if a field was added without spec(...)
        assert rule.describe(), key
        if rule.choices is not None:
            assert rule.options(), key  # a registry named in choices= resolves to names


@pytest.mark.parametrize(("key", "good", "bad"), [
    ("optim.lr", 1e-3, 0.0), ("algo.clip_low", 1.0, 1.5), ("rollout.top_p", 1.0, 0.0),
    ("run.device", "cuda:1", "gpu"), ("task.template", "Q: {prompt}", "Q: {question}"),
    ("algo.name", "cispo", "trpo"), ("model.tiny_size", "nano", "huge"),
])
def test_a_fields_rule_accepts_and_refuses(key, good, bad):
    from gradus.config import allowed

    assert allowed(key).problem(good) is None
    assert allowed(key).problem(bad) is not None


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_registry_entry_resolves_to_its_objective_and_trainer_defaults(name):
    """One entry per algorithm is the only table: resolving a config by its name gives that entry's
    loss and that entry's trainer defaults, and nothing else is needed."""
    entry = ALGORITHMS[name]
    algo = resolve_algo(load_config(overrides=[f"algo.name={name}", "rollout.max_new_tokens=12"]))
    expected = entry.objective
    if expected.agg == "seq-mean-token-sum-norm":  # its constant norm is the trainer's: rollout.max_new_tokens
        expected = dataclasses.replace(expected, agg_norm=12.0)
    assert algo.objective == expected
    t = entry.trainer
    assert (algo.kl_coef, algo.kl_estimator, algo.adv_scale) == (t.kl_coef, t.kl_estimator, t.adv_scale)
    assert (algo.dynamic_sampling, algo.overlong_shaping) == (t.dynamic_sampling, t.overlong_shaping)
    assert (algo.epochs, algo.minibatches) == (t.epochs, t.minibatches)
    assert algo.uses_critic == entry.uses_critic
    assert algo.kl_in_reward == ESTIMATORS[t.advantage].kl_in_reward  # PPO's GAE, RLOO, REINFORCE++


def test_the_algorithm_names_everywhere_are_the_registrys(capsys):
    from gradus.cli import main
    from gradus.compare import DEFAULT_ALGOS
    from gradus.config import allowed

    assert allowed("algo.name").options() == tuple(ALGORITHMS)  # what `gradus train --algo X` accepts
    assert main(["algos"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")][1:] == list(ALGORITHMS)
    assert set(DEFAULT_ALGOS) <= set(ALGORITHMS)
    with pytest.raises(ConfigError, match="algo.name must be one of " + ", ".join(ALGORITHMS)):
        validate(load_config(overrides=["algo.name=trpo"]))
