"""Training a mixture-of-experts policy: the rollout's routing reaches the update, R3 forces it there, R2 forces
the old policy's, the router's load-balancing loss trains the router, and a bf16 sampling copy follows the
fp32 policy after every update."""

import pytest
import torch
from conftest import save_untrained

from gradus.config import ConfigError, load_config
from gradus.train import moe
from gradus.train.runlog import read_metrics
from gradus.train.trainer import Trainer

from .conftest import tiny_overrides


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return save_untrained(tmp_path_factory.mktemp("nano_moe"), "nano", arch="qwen2_moe")


def steps_of(trainer):
    return [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "reward/mean" in r]


def run(moe_dir, tmp_path, reward, **extra):
    trainer = Trainer(load_config(overrides=tiny_overrides(moe_dir, tmp_path, **{"task.rewards": reward, **extra})))
    trainer.fit()
    return trainer


def test_r3_with_the_same_dtype_trains_on_exactly_the_rollouts_routing(moe_dir, tmp_path, signal_reward,
                                                                      monkeypatch):
    calls = []
    original = moe.training_forward
    monkeypatch.setattr(moe, "training_forward", lambda model, experts: calls.append((model, experts)) or original(
        model, experts))
    trainer = run(moe_dir, tmp_path, signal_reward, **{"algo.routing_replay": "r3"})
    # every forward of the policy was forced (the reference's is not): in fp32 the free routing would agree
    # anyway, so the checks below alone could not tell R3 from none
    forced = [experts for model, experts in calls if model is trainer.policy]
    assert forced and all(f is not None and (f >= 0).any() for f in forced)
    for record in steps_of(trainer):
        assert record["routing/layer_mismatch_frac"] == 0.0 and record["routing/token_mismatch_frac"] == 0.0
        assert record["actor/ratio_min"] == 1.0 and record["actor/ratio_max"] == 1.0  # on-policy: exactly 1
        assert record["mismatch/kl_k3"] < 1e-9  # the trainer's log-probs are the rollout's (fp32 both)


def test_bf16_rollout_routes_differently_and_r3_removes_it(moe_dir, tmp_path, signal_reward):
    # about 0.4% of (token, layer) pairs flip in bf16 on this model: a batch of ~2,000 tokens shows some
    big = {"rollout.dtype": "bfloat16", "run.steps": 1, "rollout.prompts_per_step": 32, "rollout.max_new_tokens": 16}
    plain = run(moe_dir, tmp_path / "plain", signal_reward, **big)
    found = steps_of(plain)[0]
    assert found["routing/layer_mismatch_frac"] > 0  # bf16 sampling picks other experts for some tokens
    assert found["mismatch/kl_k3"] > 1e-7
    replayed = run(moe_dir, tmp_path / "r3", signal_reward, **big, **{"algo.routing_replay": "r3"})
    assert steps_of(replayed)[0]["routing/layer_mismatch_frac"] == 0.0


@pytest.fixture
def forced(monkeypatch):
    """The experts each training forward is forced to, in order (None: a forward that routes freely)."""
    seen = []
    original = moe.training_forward
    monkeypatch.setattr(moe, "training_forward", lambda model, experts: seen.append(experts) or original(model,
                                                                                                         experts))
    return seen


def test_r2_replays_the_old_policys_routing_in_every_update_forward(moe_dir, tmp_path, signal_reward, forced):
    run(moe_dir, tmp_path, signal_reward, **{"algo.routing_replay": "r2", "optim.minibatches": 2, "run.steps": 1})
    # the old log-prob pass runs free (None) and records; both minibatches' forwards replay what it recorded
    assert forced and forced[0] is None
    updates = [f for f in forced[1:] if f is not None]
    assert len(updates) >= 2 and all((f >= 0).any() for f in updates)


def test_r2_with_no_old_pass_records_the_first_epoch(moe_dir, tmp_path, signal_reward, forced):
    run(moe_dir, tmp_path, signal_reward, **{"algo.routing_replay": "r2", "optim.epochs": 2, "run.steps": 1})
    # one minibatch: no old log-prob pass; the first epoch's forwards are the old policy's, run free and recorded,
    # and the second epoch's are forced to what they recorded
    assert forced and forced[0] is None
    first = forced.index(next(f for f in forced if f is not None))
    assert first >= 1 and all(f is None for f in forced[:first])
    assert all(f is not None and (f >= 0).any() for f in forced[first:])


def test_router_aux_loss_reaches_the_router(moe_dir, tmp_path, signal_reward):
    gates = {}
    for coef in (0.0, 0.5):
        trainer = run(moe_dir, tmp_path / str(coef), signal_reward, **{"run.steps": 1, "model.router_aux_coef": coef})
        gates[coef] = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if n.endswith("gate.weight")}
        record = steps_of(trainer)[0]
        assert ("actor/router_aux_loss" in record) == (coef > 0)
    assert gates[0.0] and all(not torch.equal(gates[0.0][n], gates[0.5][n]) for n in gates[0.0])
    assert record["actor/router_aux_loss"] > 0


def test_bf16_sampling_copy_follows_the_policy(nano_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "task.rewards": signal_reward, "run.steps": 2, "rollout.dtype": "bfloat16"})))
    copy = trainer.engine.model
    assert trainer.engine.holds_weights and copy is not trainer.policy
    assert next(copy.parameters()).dtype == torch.bfloat16
    trainer.fit()
    for p, q in zip(trainer.policy.parameters(), copy.parameters(), strict=True):
        assert torch.equal(p.detach().to(torch.bfloat16), q)
    # buffers keep their dtype: the rotary frequencies rounded to bf16 would misplace long positions
    for (name, b), (_, c) in zip(trainer.policy.named_buffers(), copy.named_buffers(), strict=True):
        assert c.dtype == b.dtype and torch.equal(b, c), name


def test_moe_settings_on_a_dense_model_are_refused(nano_dir, tmp_path):
    for key, value in (("algo.routing_replay", "r3"), ("model.router_aux_coef", 0.1)):
        with pytest.raises(ConfigError, match="dense|no router"):
            Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{key: value})))
