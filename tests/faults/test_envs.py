"""Environments and tools that hurt a run: each costs its own episode (flagged, named in the log) or becomes an
observation the model reads, never the run; a user environment that cannot load is refused before any work."""

import logging
from pathlib import Path

import pytest
from envs.scripted import Scripted

from gradus.cli import main
from gradus.envs.calls import EnvCalls
from gradus.envs.episodes import EpisodeRunner, Limits
from gradus.models import build_char_tokenizer
from gradus.rollout import SamplingParams
from gradus.tasks import Example

ENVS = str(Path(__file__).parents[1] / "envs" / "sample_envs.py")


def _run(env, turns, *, max_turns=3, max_tokens=60, timeout_s=10.0, positions=None):
    tokenizer = build_char_tokenizer()
    calls = EnvCalls(f"{ENVS}:{env}", timeout_s=timeout_s)
    try:
        examples = [Example("go:", "", source="rows.jsonl: row 3")]
        prompts = [tokenizer("go:", add_special_tokens=False)["input_ids"]]
        runner = EpisodeRunner(calls, tokenizer, Limits(max_turns, max_tokens, positions))
        return runner.run(Scripted(tokenizer, turns), prompts, examples, 2, SamplingParams(max_new_tokens=30), [1])
    finally:
        calls.close()


@pytest.mark.parametrize("env, words", [
    ("Raising", ["RuntimeError", "the environment broke"]),
    ("BadObservation", ["observation is a dict"]),
    ("NanReward", ["reward is nan"]),
])
def test_a_broken_step_ends_its_episode_flagged_and_named(env, words, caplog):
    with caplog.at_level(logging.WARNING, logger="gradus.envs"):
        got = _run(env, ["12"])
    assert got.failed.all() and got.rewards.tolist() == [0.0, 0.0]
    assert got.batch.loss_tokens.sum() == 0  # its reward says nothing of the model: none of it is trained
    assert got.metrics["env/failed"] == 1.0
    text = caplog.text
    assert "environment" in text and "episode 0" in text and "rows.jsonl: row 3" in text
    for word in words:
        assert word in text, text


def test_a_hanging_step_times_out_and_the_run_goes_on(caplog):
    with caplog.at_level(logging.WARNING, logger="gradus.envs"):
        got = _run("Hanging", ["12"], timeout_s=1.0)
    assert got.failed.all()
    assert "timeout" in caplog.text and "2 episode(s)" in caplog.text and "episode 0" in caplog.text


def test_an_environment_that_never_ends_stops_at_the_turn_limit():
    got = _run("Counter", ["1"], max_turns=3)
    assert got.turns.tolist() == [3, 3] and not got.failed.any()
    assert got.rewards.tolist() == [0.75, 0.75]


def test_an_answer_that_overflows_the_budget_truncates_the_episode():
    got = _run("Flood", ["1"], max_turns=3, max_tokens=40)
    assert got.batch.truncated.all() and not got.failed.any()
    assert int(got.batch.lengths.max()) <= 40 and got.turns.tolist() == [1, 1]


def test_an_episode_that_would_overflow_the_models_positions_is_truncated():
    # a budget of 1000 tokens, but the prompt "go:" (3 tokens) leaves 37 of the model's 40 positions
    got = _run("Counter", ["12345"], max_turns=10, max_tokens=1000, positions=40)
    assert got.batch.truncated.all() and not got.failed.any()
    assert int(got.batch.lengths.max()) <= 37


@pytest.mark.parametrize("turn, words", [
    ("<tool>calc: 6*7</tool>", ["<result>42</result>"]),
    ("<tool>calc 6*7", ["malformed tool call"]),
    ("<tool>boom: 1</tool>", ["tool boom failed", "ZeroDivisionError"]),
    ("<tool>nope: 1</tool>", ["tool nope failed", "no tool 'nope'"]),
])
def test_tool_calls_and_their_failures_become_observations(turn, words):
    tokenizer = build_char_tokenizer()
    got = _run("Tools", [turn, "42"], max_tokens=200)
    assert not got.failed.any() and got.success.all() and got.turns.tolist() == [2, 2]
    b = got.batch
    answer = tokenizer.decode(b.completion_ids[0][(b.action_mask[0] == 0) & (b.completion_mask[0] == 1)])
    for word in words:
        assert word in answer, answer
    assert got.metrics["env/tool_calls"] == 2


def test_a_hanging_tool_times_out_into_an_observation():
    tokenizer = build_char_tokenizer()
    got = _run("Tools", ["<tool>sleep: 1</tool>", "42"], max_tokens=200, timeout_s=1.0)
    assert not got.failed.any() and got.success.all()
    b = got.batch
    answer = tokenizer.decode(b.completion_ids[0][(b.action_mask[0] == 0) & (b.completion_mask[0] == 1)])
    assert "timed out after 1 s" in answer and got.metrics["env/tool_timeouts"] == 2


@pytest.mark.parametrize("spec, words", [
    ("{dir}/broken.py:Env", ["broken.py does not import", "SyntaxError"]),
    ("{dir}/missing.py:Env", ["no file"]),
    ("{dir}/fine.py:Nope", ["has no class 'Nope'"]),
    ("{dir}/fine.py:NotAnEnv", ["has no reset or step method"]),
    ("{dir}/fine.py:NoStep", ["NoStep has no step method"]),
])
def test_a_user_environment_that_cannot_load_is_refused_before_any_work(spec, words, tmp_path, capsys):
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "fine.py").write_text("from gradus.envs import BaseEnvironment\n\n\nclass NotAnEnv:\n    pass\n\n\n"
                                      "class NoStep(BaseEnvironment):\n    pass\n")
    argv = ["train", "--env", spec.format(dir=tmp_path), "--no-progress", "run.steps=1",
            f"run.out_dir={tmp_path}/runs", f"run.cache_dir={tmp_path}/cache"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "env.name" in err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "cache").exists()  # refused before the warm start


def test_an_openenv_environment_without_openenv_installed_says_which_extra_to_install(monkeypatch):
    import sys

    from gradus.envs.adapters import INSTALL_HINT, OpenEnvAdapter

    for module in ("openenv", "openenv.core", "openenv.core.env_server"):
        monkeypatch.setitem(sys.modules, module, None)  # `import openenv` raises ImportError, as where it is absent

    class Game(OpenEnvAdapter):
        name = "game"

    with pytest.raises(ImportError) as caught:
        Game()
    message = str(caught.value)
    assert "\n" not in message and INSTALL_HINT in message and 'pip install -e ".[openenv]"' in message
