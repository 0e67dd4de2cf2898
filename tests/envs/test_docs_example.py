"""The environments of docs/environments.md run as the page says."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradus.envs.calls import EnvCalls
from gradus.envs.episodes import EpisodeRunner, Limits
from gradus.models import build_char_tokenizer
from gradus.rollout import SamplingParams
from gradus.tasks import get_task
from gradus.train.data import encode_prompts

from .scripted import Scripted

PAGE = (Path(__file__).parents[2] / "docs" / "environments.md").read_text()


def block_after(marker: str) -> str:
    rest = PAGE[PAGE.index(marker):]
    return re.search(r"```python\n(.*?)```", rest, re.S).group(1)


def test_the_calculator_example_answers_tool_calls_and_scores_the_answer(tmp_path):
    path = tmp_path / "countdown_calc.py"
    path.write_text(block_after("This file, `countdown_calc.py`"))
    task = get_task("countdown", seed=0)
    example = task.train_example(0)
    tokenizer = build_char_tokenizer()
    prompts = encode_prompts(task, tokenizer, [example])
    calls = EnvCalls(f"{path}:CountdownWithCalculator", timeout_s=10)
    try:
        runner = EpisodeRunner(calls, tokenizer, Limits(3, 120))
        got = runner.run(Scripted(tokenizer, [f"<tool>calc: {example.answer}</tool>", example.answer]),
                         prompts.ids, [example], 1, SamplingParams(max_new_tokens=40), [0])
    finally:
        calls.close()
    assert got.success.tolist() == [True] and got.turns.tolist() == [2]
    b = got.batch
    answer = tokenizer.decode(b.completion_ids[0][(b.action_mask[0] == 0) & (b.completion_mask[0] == 1)])
    assert answer == f"</s><result>{example.meta['target']}</result>" or \
        answer == f"<result>{example.meta['target']}</result>"


def test_the_openenv_example_prints_what_the_page_says(tmp_path):
    pytest.importorskip("openenv")
    path = tmp_path / "guess_openenv.py"
    path.write_text(block_after("This game is written in OpenEnv's own API"))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(Path(__file__).parents[2] / "src"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["5 lower 0.0 False", "2 higher 0.0 False", "3 higher 0.0 False",
                                       "4 correct 1.0 True"]


def test_the_openenv_example_plays_episodes_in_the_environment_workers(tmp_path):
    pytest.importorskip("openenv")
    code = block_after("This game is written in OpenEnv's own API")
    path = tmp_path / "guess_openenv.py"
    path.write_text(code[: code.index("env = Guess(")])  # the classes, not the driving loop
    tokenizer = build_char_tokenizer()
    prompt = tokenizer("Guess a number in 1..10.", add_special_tokens=False)["input_ids"]
    example = get_task("guess").train_example(0)
    example = type(example)("Guess a number in 1..10.", "", meta={"seed": 3})  # the secret is 4 (the page)
    calls = EnvCalls(f"{path}:Guess", {"top": 10}, timeout_s=30)
    try:
        runner = EpisodeRunner(calls, tokenizer, Limits(6, 200))
        got = runner.run(Scripted(tokenizer, ["5", "2", "3", "4"]), [prompt], [example], 2,
                         SamplingParams(max_new_tokens=8), [0])
    finally:
        calls.close()
    assert got.success.tolist() == [True, True] and got.turns.tolist() == [4, 4]
    assert got.rewards.tolist() == [1.0, 1.0] and not got.failed.any()
    b = got.batch
    answers = tokenizer.decode(b.completion_ids[0][(b.action_mask[0] == 0) & (b.completion_mask[0] == 1)])
    assert answers == "lowerhigherhigher"
