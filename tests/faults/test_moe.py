"""Mixture-of-experts runs: settings that would silently do nothing, or wrong, and a step that turned NaN.
Each case failed on the code before its fix."""

import pytest
from conftest import save_untrained
from train.conftest import tiny_overrides

from gradus.compare.runner import ComparePlan, validate_plan
from gradus.config import ConfigError, load_config
from gradus.train.runlog import read_metrics
from gradus.train.tally import NothingLearned
from gradus.train.trainer import Trainer


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return save_untrained(tmp_path_factory.mktemp("nano_moe"), "nano", arch="qwen2_moe")


def test_a_minibatch_with_no_counted_token_is_not_a_nan_step(moe_dir, tmp_path, signal_reward):
    # every completion is cut at 2 tokens and the filter masks truncated ones: nothing counts, and the router
    # loss's share (0 / 0) made the step NaN, skipped, and five in a row stopped the run
    trainer = Trainer(load_config(overrides=tiny_overrides(moe_dir, tmp_path, **{
        "task.rewards": signal_reward, "run.steps": 1, "rollout.max_new_tokens": 2, "algo.overlong_filter": "true"})))
    with pytest.raises(NothingLearned, match="every token at weight 0"):  # nothing counted: nothing learned
        trainer.fit()
    record = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl") if "reward/mean" in r][0]
    assert record["rollout/truncated_frac"] == 1.0 and record["actor/skipped_updates"] == 0.0


def test_r2_with_nothing_to_replay_is_refused(moe_dir, tmp_path):
    # one epoch of one minibatch: the only forward is the old policy's own, so r2 would silently do nothing
    with pytest.raises(ConfigError, match="r2 would change nothing"):
        Trainer(load_config(overrides=tiny_overrides(moe_dir, tmp_path, **{"algo.routing_replay": "r2"})))


def test_variants_whose_run_names_collide_are_refused(tmp_path):

    # both would be grpo+dtype=bfloat16-seed0: the second would find the first's results and skip itself
    plan = ComparePlan(algos=["grpo:rollout.dtype=bfloat16", "grpo:model.dtype=bfloat16"], seeds=1)
    with pytest.raises(ConfigError, match="would both be named 'grpo\\+dtype=bfloat16-seed0'"):
        validate_plan(plan, tmp_path)
