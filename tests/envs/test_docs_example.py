"""The environments of docs/environments.md run as the page says."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradus.envs.calls import EnvCalls
from gradus.envs.episodes import EpisodeRunner, Limits
from gradus.models import build_char_tokenizer
from gradus.rollout import RolloutBatch, SamplingParams
from gradus.tasks import get_task
from gradus.train.data import encode_prompts

PAGE = (Path(__file__).parents[2] / "docs" / "environments.md").read_text()


def block_after(marker: str) -> str:
    rest = PAGE[PAGE.index(marker):]
    return re.search(r"```python\n(.*?)```", rest, re.S).group(1)


class Scripted:
    def __init__(self, tokenizer, turns):
        self.tokenizer, self.turns, self.calls = tokenizer, turns, 0

    def generate(self, prompts, n, params, *, seed=None, seeds=None):
        ids = self.tokenizer(self.turns[self.calls], add_special_tokens=False)["input_ids"]
        ids = ids + [self.tokenizer.eos_token_id]
        self.calls += 1
        B = len(prompts) * n
        P = max(len(p) for p in prompts)
        prompt = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts for _ in range(n)])  # [B, P]
        return RolloutBatch(
            prompt_ids=prompt, prompt_mask=(prompt != 0).long(),
            completion_ids=torch.tensor([ids] * B), completion_mask=torch.ones(B, len(ids), dtype=torch.long),
            sampling_logp=torch.full((B, len(ids)), -0.5), lengths=torch.full((B,), len(ids)),
            truncated=torch.zeros(B, dtype=torch.bool), prompt_index=torch.arange(len(prompts)).repeat_interleave(n))


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
