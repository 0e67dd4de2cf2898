"""Fault corpus: rewards that hang (in C, holding the GIL), swallow exceptions, exit, or return inf/nan.

Every case here hung, crashed the test process or passed bad values on before the reward workers
(gradus.rewards.pool): the old SIGALRM limit could not stop C code or a reward that catches Exception, a
SystemExit or os._exit in a reward ended the process, 1e308 went on to become inf, and answer extraction was
quadratic. Limits are short (0.5-1 s) to keep the file fast; the bounds on wall time leave room for a busy
machine (worker restarts, 2 cores shared).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gradus.rewards import CombinedReward, RewardSpec, RewardTimeout
from gradus.rewards.extract import extract_answer, last_boxed
from gradus.tasks import get_task
from gradus.train.scoring import Scorer

HOSTILE = """
import math, os, time

def stubborn(prompts, completions, **fields):
    # Catches every Exception, so an exception raised to stop it (the old SIGALRM limit) is swallowed.
    if any("x" in c for c in completions):
        while True:
            try:
                time.sleep(0.01)
            except Exception:
                pass
    return [1.0] * len(completions)

def exits(prompts, completions, **fields):
    if any("x" in c for c in completions):
        raise SystemExit(3)
    return [1.0] * len(completions)

def interrupts(prompts, completions, **fields):
    raise KeyboardInterrupt

def hard_exit(prompts, completions, **fields):
    if any("x" in c for c in completions):
        os._exit(1)
    return [1.0] * len(completions)

def holds_gil(prompts, completions, **fields):
    # One C call of many seconds (a 332-million-bit power): no signal handler runs until it ends.
    if any("x" in c for c in completions):
        return [float((10 ** 10 ** 8) % 7)]
    return [1.0] * len(completions)

def huge(prompts, completions, **fields):
    return [1e308] * len(completions)

def infinite(prompts, completions, **fields):
    return [math.inf] * len(completions)

def nan(prompts, completions, **fields):
    return [math.nan] * len(completions)

def buggy(prompts, completions, **fields):
    raise RuntimeError("reward bug on " + completions[0])
"""


@pytest.fixture
def hostile(tmp_path, monkeypatch) -> str:
    (tmp_path / "gradus_fault_rewards.py").write_text(textwrap.dedent(HOSTILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gradus_fault_rewards"


def _score(specs: list, completions: list[str], timeout_s: float = 1.0, **fields: list) -> tuple:
    """(result, seconds) of one CombinedReward call on a fresh pool of 2 workers."""
    n = len(completions)
    with CombinedReward(specs, timeout_s=timeout_s, workers=2) as combined:
        start = time.perf_counter()
        result = combined(["p"] * n, completions, **fields)
        return result, time.perf_counter() - start


def test_math_in_c_ends_at_the_limit() -> None:
    # sympy evaluates both in one C call that holds the GIL: the old limits (2 s, 5 s) never fired. The
    # last completion took minutes in the old extraction, which also ran outside the limit.
    completions = [r"so \boxed{9^{9^{9^{9}}}}", r"\boxed{3}", r"\boxed{100000000!}", r"\boxed{4}", "the answer is 3",
                   "\\boxed{" * 50_000]
    answers = ["1", "3", "1", "3", "3", "3"]
    result, seconds = _score(["math_equivalent"], completions, timeout_s=0.5, answer=answers)
    assert result.parts["math_equivalent"] == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # only the culprits lose their score
    assert result.timeouts == 2 and result.errors == 0
    # Both chunks' limits (0.5 s), the culprits' own; and each kill restarts a worker, which imports
    # math_verify again (about 2 s on a busy 2-core machine).
    assert seconds < 10.0


def test_reward_that_catches_exception_is_stopped(hostile: str) -> None:
    result, seconds = _score([f"{hostile}:stubborn"], ["a", "b", "x", "c"], timeout_s=0.5)
    assert result.total == [1.0, 1.0, 0.0, 1.0] and result.timeouts == 1
    assert seconds < 4.0


def test_reward_holding_the_gil_in_c_is_stopped(hostile: str) -> None:
    result, seconds = _score([f"{hostile}:holds_gil"], ["a", "x", "b"], timeout_s=0.5)
    assert result.total == [1.0, 0.0, 1.0] and result.timeouts == 1
    assert seconds < 4.0


@pytest.mark.parametrize("fn", ["exits", "hard_exit"])
def test_reward_that_exits_does_not_end_the_trainer(hostile: str, fn: str) -> None:
    # SystemExit used to escape the `except Exception` and end the process; os._exit ended it outright.
    result, _ = _score([f"{hostile}:{fn}", "exact_match"], ["x", "a", "1"], answer=["1", "1", "1"])
    assert result.parts[f"{hostile}:{fn}"] == [0.0, 1.0, 1.0] and result.errors == 1
    assert result.parts["exact_match"] == [0.0, 0.0, 1.0]


def test_keyboard_interrupt_in_a_reward_is_an_error(hostile: str) -> None:
    result, _ = _score([f"{hostile}:interrupts"], ["a", "b"])
    assert result.total == [0.0, 0.0] and result.errors == 2


@pytest.mark.parametrize("fn", ["huge", "infinite", "nan"])
def test_absurd_scores_are_errors_named_in_the_log(hostile: str, fn: str, caplog) -> None:
    # 1e308 is finite but becomes inf in the float32 rewards; it used to reach the advantages silently.
    with caplog.at_level(logging.WARNING, logger="gradus.rewards"):
        result, _ = _score([f"{hostile}:{fn}", ("exact_match", 2.0)], ["1", "2"], answer=["1", "1"])
    assert result.total == [2.0, 0.0] and result.errors == 2
    message = caplog.records[0].getMessage()  # the first failure; the second record is close()'s total
    assert f"{hostile}:{fn}" in message and "finite number within" in message


def test_scorer_never_passes_inf_on(hostile: str) -> None:
    task = get_task("arithmetic")
    examples = task.heldout(4)
    scorer = Scorer(task, [RewardSpec(f"{hostile}:huge"), RewardSpec("numeric_match")], timeout_s=1.0,
                    strict=False, workers=2)
    try:
        scores = scorer.score([e.prompt for e in examples], [e.answer for e in examples], examples)
    finally:
        scorer.close()
    assert torch.isfinite(scores.rewards).all()
    assert scores.rewards.tolist() == [1.0] * 4 and scores.metrics["reward/errors"] == 4


def test_the_task_verifier_runs_under_the_limit_too() -> None:
    # With rewards=format on a math task, the verifier (math_equivalent) used to run in the trainer's
    # process with no limit, for training and held-out evaluation alike.
    task = get_task("math_file")
    examples = task.heldout(2)
    prompts = [e.prompt for e in examples]
    completions = [r"\boxed{9^{9^{9^{9}}}}", f"\\boxed{{{examples[1].answer}}}"]
    scorer = Scorer(task, [RewardSpec("format")], timeout_s=0.5, strict=False, workers=2)
    try:
        start = time.perf_counter()
        scores = scorer.score(prompts, completions, examples)
        verdict = scorer.verify(prompts, completions, examples)
        seconds = time.perf_counter() - start
    finally:
        scorer.close()
    assert scores.correct.tolist() == [False, True] and verdict == [False, True]
    assert scores.rewards.tolist() == [1.0, 1.0]  # format only; the verifier's part has weight 0
    assert "reward/math_equivalent" not in scores.metrics and scores.metrics["reward/timeouts"] == 1
    assert seconds < 10.0


def test_first_failure_logged_with_traceback_then_counted(hostile: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="gradus.rewards"):
        with CombinedReward([f"{hostile}:buggy"], workers=2) as combined:
            first = combined(["p"] * 3, ["a", "b", "c"])
            second = combined(["p"] * 2, ["d", "e"])
            assert len(caplog.records) == 1  # later failures are only counted
        assert len(caplog.records) == 2  # close() sums them up
    assert first.errors == 3 and second.errors == 2
    logged = caplog.records[0].getMessage()
    assert f"{hostile}:buggy" in logged and "Traceback" in logged and "RuntimeError: reward bug on" in logged
    assert "5 completion(s)" in caplog.records[1].getMessage()


def test_strict_rewards_stay_fatal(hostile: str) -> None:
    with pytest.raises(RewardTimeout, match="stubborn"), CombinedReward(
        [f"{hostile}:stubborn"], timeout_s=0.5, strict=True, workers=2
    ) as combined:
        combined(["p"], ["x"])
    with pytest.raises(RuntimeError, match="finite"), CombinedReward([f"{hostile}:huge"], strict=True) as combined:
        combined(["p"], ["a"])


# Each of these took from tens of seconds to hours in the old quadratic extraction (rescanning to the end
# of the text from every unclosed \boxed{); other hostile shapes are in tests/test_rewards.py.
ADVERSARIAL = {
    "100 KB of unclosed boxes": "\\boxed{" * 15_000,  # took 42 s
    "1 MB of unclosed boxes": "\\boxed{" * 150_000,
    "unclosed boxes with braces": "\\boxed{{" * 100_000,
    "boxes then braces": "\\boxed{1}" + "{" * 500_000 + "\\boxed{" * 50_000,
}


@pytest.mark.parametrize("text", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_extraction_is_linear(text: str) -> None:
    start = time.perf_counter()
    extract_answer(text)
    assert time.perf_counter() - start < 1.0


def test_extraction_keeps_its_answers() -> None:
    assert last_boxed(ADVERSARIAL["boxes then braces"]) == "1"
    assert last_boxed("\\boxed{" * 1000 + "7}") == "7"
    assert last_boxed("\\boxed{\\boxed{2}} \\boxed{3") == "2"


def test_worker_killed_from_outside_is_replaced(hostile: str) -> None:
    with CombinedReward(["exact_match"], workers=2) as combined:
        for pid in combined.pool.pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        result = combined(["p"], ["1"], answer=["1"])
    assert result.total == [1.0] and result.errors == 0


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (dead, not yet reaped by its parent's parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


PARENT = """
import sys, threading, time
sys.path[:0] = {paths!r}
from gradus.rewards import CombinedReward
combined = CombinedReward(["{module}:stubborn", "{module}:holds_gil"], timeout_s=60, workers=2)
print(" ".join(map(str, combined.pool.pids())), flush=True)
threading.Thread(target=combined, args=(["p"] * 2, ["x", "x"]), daemon=True).start()
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(hostile: str) -> None:
    # One worker loops in Python (its lifeline thread sees the parent go), one holds the GIL in C (the
    # kernel's parent-death signal ends it).
    code = PARENT.format(paths=sys.path, module=hostile)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.0)  # both are busy now
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5.0
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids)
    finally:
        parent.kill()
        parent.stdout.close()


def test_close_leaves_no_process(hostile: str) -> None:
    combined = CombinedReward([f"{hostile}:stubborn"], timeout_s=30, workers=2)
    pids = combined.pool.pids()
    combined.close()
    assert all(_gone(p) for p in pids)
    # An interpreter that exits without close() neither hangs nor leaves workers behind.
    code = f"import sys; sys.path[:0] = {sys.path!r}\nfrom gradus.rewards import CombinedReward\n" \
           f"c = CombinedReward(['{hostile}:stubborn'], workers=2)\nprint(*c.pool.pids())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    time.sleep(0.2)
    assert len(pids) == 2 and all(_gone(p) for p in pids)
