"""Tests of gradus.rewards: extraction, each reward right and wrong, safety, time limits, combining.

Hostile rewards and completions (hangs in C, SystemExit, os._exit, inf) are in tests/faults/test_rewards.py.
"""

from __future__ import annotations

import random
import sys
import textwrap
import threading
import time
from fractions import Fraction

import pytest

from gradus.rewards import (
    CombinedReward,
    RewardError,
    RewardSpec,
    RewardTimeout,
    available_rewards,
    extract_answer,
    get_reward,
    is_equivalent,
)
from gradus.rewards.countdown import countdown_expression, countdown_value
from gradus.rewards.extract import last_boxed, parse_number


def test_extraction_rules() -> None:
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{{x}^{2}}") == "{x}^{2}"
    assert last_boxed(r"\boxed{3} then \boxed{4") == "3"  # the unclosed last one is skipped
    assert last_boxed("no box") is None
    assert extract_answer(r"I think 5. So \boxed{7}") == "7"
    assert extract_answer("Adding up, the answer is 42.\nDone 9") == "42"
    assert extract_answer("The Answer is: $3/4$.") == "3/4"
    assert extract_answer("we get 3 then 1,000 apples") == "1,000"
    assert extract_answer("no digits here") is None
    assert (
        parse_number("1,000") == 1000 and parse_number("-0") == 0 and parse_number(" 2.50 ") == Fraction(5, 2)
    )
    assert parse_number("3/0") is None and parse_number("1e5") is None and parse_number("abc") is None


def _last_boxed_by_rescanning(text: str) -> str | None:
    """The old quadratic last_boxed, kept as the oracle: from the last \\boxed{ backwards, scan forward."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for j in range(start + 6, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[start + 7 : j].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


def test_last_boxed_matches_the_rescanning_oracle() -> None:
    rng = random.Random(0)
    atoms = ["{", "}", "{{", "}}", "\\boxed{", "\\boxed{{", "\\boxed", "\\", "boxed{", "x"]
    for _ in range(20_000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        assert last_boxed(text) == _last_boxed_by_rescanning(text), text


@pytest.mark.parametrize(
    "text",
    ["\\boxed{" + "{" * 1_000_000 + "}" * 999_999, "\\boxed{" + "x" * 1_000_000, "{{}}" * 50_000,
     "the answer is " * 70_000, "1," * 500_000, "answer" + " " * 1_000_000 + "\n"],
    ids=["deep nesting", "long unclosed brace", "pairs", "answer is", "digits and commas", "spaces"],
)
def test_extraction_stays_fast_on_hostile_text(text: str) -> None:
    # The quadratic shapes that used to hang are in tests/faults/test_rewards.py; these never did.
    start = time.perf_counter()
    extract_answer(text)
    assert time.perf_counter() - start < 1.0


def test_registry_is_strict() -> None:
    assert {"math_equivalent", "countdown", "exact_match", "numeric_match", "format"} <= set(
        available_rewards()
    )
    with pytest.raises(ValueError, match="countdown.*exact_match"):
        get_reward("exact")
    with pytest.raises(ValueError, match="bad options"):
        get_reward("countdown", pattern="x")  # countdown takes no options
    with pytest.raises(ValueError, match="cannot import module 'nosuchmodule_xyz'"):
        get_reward("nosuchmodule_xyz:fn")
    with pytest.raises(ValueError, match="module:function"):
        get_reward("os:")


EQUIVALENT = [
    ("1/2", r"\boxed{0.5}"),
    ("0.5", r"\boxed{\frac{1}{2}}"),
    (r"\frac{1}{2}", "so the answer is 1/2"),
    ("3", r"\boxed{3.0}"),
    ("0", r"\boxed{-0}"),
    ("1000", r"\boxed{1,000}"),  # thousands commas are read as grouping
    ("3/4", r"\boxed{\dfrac{3}{4}}"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}"),
    ("12", "First 5, then 7, total 12"),
]
NOT_EQUIVALENT = [
    ("1/2", r"\boxed{0.25}"),
    ("3", r"\boxed{4}"),
    ("3", "no answer here"),
    ("3", r"\boxed{\frac{garbage}"),
    ("1/3", r"\boxed{0.333333}"),  # plain numbers compare exactly
    ("7", "answer is 7a"),
    (r"\sqrt{2}", r"\boxed{1.4142}"),
]


@pytest.mark.parametrize(("answer", "completion"), EQUIVALENT)
def test_math_equivalent_right(answer: str, completion: str) -> None:
    assert is_equivalent(answer, completion)
    assert get_reward("math_equivalent")(["q"], [completion], answer=[answer]) == [1.0]


@pytest.mark.parametrize(("answer", "completion"), NOT_EQUIVALENT)
def test_math_equivalent_wrong(answer: str, completion: str) -> None:
    assert get_reward("math_equivalent")(["q"], [completion], answer=[answer]) == [0.0]


def test_exact_and_numeric_match() -> None:
    exact = get_reward("exact_match")
    assert exact(["p"] * 3, [" 357 ", "357.0", "35"], answer=["357"] * 3) == [1.0, 0.0, 0.0]
    numeric = get_reward("numeric_match")
    completions = ["357", "357.0", "-0", "1,000", "3/6", "356", "357abc", ""]
    answers = ["357", "357", "0", "1000", "0.5", "357", "357", "0"]
    assert numeric(["p"] * 8, completions, answer=answers) == [1, 1, 1, 1, 1, 0, 0, 0]
    assert get_reward("exact_match", numeric=True)(["p"], ["2.0"], answer=["2"]) == [1.0]
    with pytest.raises(ValueError, match="entries"):
        exact(["p"], ["1", "2"], answer=["1"])


def test_format_reward() -> None:
    boxed = get_reward("format")
    assert boxed(["p"] * 4, [r"x \boxed{3}", r"\boxed{}", "3", r"\boxed{3"], answer=["3"] * 4) == [1, 0, 0, 0]
    digits = get_reward("format", pattern=r"-?\d+", fullmatch=True)
    assert digits(["p"] * 3, ["-12", "12 apples", "x"]) == [1.0, 0.0, 0.0]
    search = get_reward("format", pattern=r"<answer>.*</answer>")
    assert search(["p"] * 2, ["think <answer>1\n2</answer>", "none"]) == [1.0, 0.0]


def _cd(completions: list[str], numbers: list[int], target: int) -> list[float]:
    n = len(completions)
    return get_reward("countdown")(["p"] * n, completions, numbers=[numbers] * n, target=[target] * n)


def test_countdown_right_and_wrong() -> None:
    # 3, 5, 7 -> 22: 3*5+7 = 22 (by hand); 7*3+5 = 26; (7-5)*3 = 6.
    assert (
        _cd(
            ["3*5+7", "7+5*3", "(3*5)+7 = 22", r"so \boxed{5*3+7}", "<answer>7 + 3 × 5</answer>"],
            [3, 5, 7],
            22,
        )
        == [1.0] * 5
    )
    assert _cd(["7*3+5", "(7-5)*3", "", "22"], [3, 5, 7], 22) == [0.0] * 4
    # Not every number must be used; each at most as often as given.
    assert _cd(["3*5"], [3, 5, 7], 15) == [1.0]
    assert _cd(["3*5+7+7-7"], [3, 5, 7], 22) == [0.0]  # 7 used three times, given once
    assert _cd(["3*5+7+7-7"], [3, 5, 7, 7, 7], 22) == [1.0]
    assert _cd(["4*5+2"], [3, 5, 7], 22) == [0.0]  # 4 and 2 are not given
    assert _cd(["-3+25"], [3, 25], 22) == [0.0]  # unary minus is not allowed


def test_countdown_exact_fractions() -> None:
    assert countdown_value("6/4*2", [6, 4, 2]) == 3  # float-free: 6/4 = 3/2, times 2 = 3
    assert _cd(["6/4*2"], [6, 4, 2], 3) == [1.0]
    assert countdown_value("1/3*3", [1, 3, 3]) == 1
    assert _cd(["1/3+1/3+1/3"], [1, 1, 1, 3, 3, 3], 1) == [1.0]  # 0.333...*3 in floats would not be exact
    assert countdown_value("5/(3-3)", [5, 3, 3]) is None  # division by zero
    assert _cd(["5/(3-3)"], [5, 3, 3], 0) == [0.0]


MALICIOUS = [
    "__import__('os').system('x')",
    "2**99999999",
    "9**9**9**9",
    "(" * 5000 + "1" + ")" * 5000,
    "(((((((((((((((((((((3)))))))))))))))))))))+5",
    "1+" * 500_000 + "1",
    "7" * 1_000_000,
    "lambda: 3",
    "x + 3",
    "(3).real",
    "[3, 5]",
    "3 if 5 else 7",
    "3; 5",
    "3 // 5",
    "3 % 5",
    "3 << 5",
    "1_5",
    "3.0*5+7",
    "True+21",
    "\x00",
    "3 5",
]


@pytest.mark.parametrize("expr", MALICIOUS, ids=[f"m{i}" for i in range(len(MALICIOUS))])
def test_countdown_rejects_malicious(expr: str) -> None:
    start = time.perf_counter()
    assert _cd([expr], [3, 5, 7, 9, 15, 21, 99999999, 1, 2], 22) == [0.0]
    assert time.perf_counter() - start < 1.0


def test_countdown_expression_extraction() -> None:
    assert countdown_expression("thinking...\n3*5+7") == "3*5+7"
    assert countdown_expression("3*5+7=22") == "3*5+7"
    assert countdown_expression(r"x \boxed{(3+5)*7} y") == "(3+5)*7"
    assert countdown_expression("a <answer>1+2</answer> b") == "1+2"


def _write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


USER_REWARDS = """
import time

def length_bonus(prompts, completions, scale=1.0, **fields):
    return [scale * len(c) for c in completions]

def sleepy(prompts, completions, **fields):
    time.sleep(30)
    return [1.0] * len(completions)

def spin(prompts, completions, **fields):
    while True:
        pass

def boom(prompts, completions, **fields):
    raise RuntimeError("reward bug")

def boom_on_x(prompts, completions, **fields):
    if any("x" in c for c in completions):
        raise RuntimeError("cannot score x")
    return [1.0] * len(completions)

def wrong_length(prompts, completions, **fields):
    return [1.0] * (len(completions) + 1)

def nan(prompts, completions, **fields):
    return [float("nan")] * len(completions)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    _write_module(tmp_path, monkeypatch, "gradus_test_user_rewards", USER_REWARDS)
    return "gradus_test_user_rewards"


def test_user_reward_loading(user_module: str) -> None:
    fn = get_reward(f"{user_module}:length_bonus")
    assert fn(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    assert get_reward(f"{user_module}:length_bonus", scale=0.5)(["p"], ["abcd"]) == [2.0]
    with pytest.raises(ValueError, match="no callable"):
        get_reward(f"{user_module}:missing")


def test_weights_combine(user_module: str) -> None:
    combined = CombinedReward(
        [
            RewardSpec("numeric_match", 2.0),
            RewardSpec(f"{user_module}:length_bonus", 0.5, {"scale": 3.0}),
            ("format", -1.0),
        ],
        timeout_s=5.0,
    )
    completions = ["12", "13", r"\boxed{12}"]
    result = combined(["6+6="] * 3, completions, answer=["12"] * 3)
    # numeric_match: 1, 0, 0; length*3: 6, 6, 30; format: 0, 0, 1.
    assert result.parts == {
        "numeric_match": [1.0, 0.0, 0.0],
        f"{user_module}:length_bonus": [6.0, 6.0, 30.0],
        "format": [0.0, 0.0, 1.0],
    }
    assert result.total == [2 * 1 + 0.5 * 6, 0.5 * 6, 0.5 * 30 - 1]
    assert result.errors == 0 and result.timeouts == 0
    metrics = result.metrics()
    assert metrics["reward/total"] == pytest.approx(sum(result.total) / 3)
    assert metrics["reward/numeric_match"] == pytest.approx(1 / 3)
    twice = CombinedReward(["format", ("format", 2.0)])
    assert set(twice(["p"], ["x"], answer=["1"]).parts) == {"format", "format#2"}


@pytest.mark.parametrize("fn", ["sleepy", "spin"])
def test_timeouts_score_zero_and_are_counted(user_module: str, fn: str) -> None:
    with CombinedReward([("exact_match", 1.0), (f"{user_module}:{fn}", 1.0)], timeout_s=0.5, workers=2) as combined:
        start = time.perf_counter()
        result = combined(["p"] * 3, ["1", "2", "3"], answer=["1", "1", "3"])
        # Every completion hangs: chunks time out (0.5 s), then each completion alone (3 on 2 workers: 1 s).
        assert time.perf_counter() - start < 4.0
        assert result.parts[f"{user_module}:{fn}"] == [0.0, 0.0, 0.0]
        assert result.total == [1.0, 0.0, 1.0]
        assert result.timeouts == 3 and result.errors == 0
    with pytest.raises(RewardTimeout), CombinedReward([f"{user_module}:{fn}"], timeout_s=0.5, strict=True) as strict:
        strict(["p"], ["1"], answer=["1"])


def test_raising_rewards_score_zero_and_are_counted(user_module: str) -> None:
    with CombinedReward([f"{user_module}:boom", "exact_match"], workers=2) as combined:
        result = combined(["p"] * 2, ["1", "2"], answer=["1", "1"])
    assert result.parts[f"{user_module}:boom"] == [0.0, 0.0] and result.errors == 2
    assert result.total == [1.0, 0.0]
    # Only the completion that makes the reward raise loses its score: its chunk is retried one by one.
    with CombinedReward([f"{user_module}:boom_on_x"], workers=2) as combined:
        partial = combined(["p"] * 5, ["a", "x", "b", "c", "d"], answer=["1"] * 5)
    assert partial.total == [1.0, 0.0, 1.0, 1.0, 1.0] and partial.errors == 1
    for bad in ("wrong_length", "nan"):
        with CombinedReward([f"{user_module}:{bad}"], workers=2) as combined:
            result = combined(["p"] * 2, ["a", "b"], answer=["1"] * 2)
        assert result.total == [0.0, 0.0] and result.errors == 2
    with pytest.raises(RewardError, match="RuntimeError: reward bug"), CombinedReward(
        [f"{user_module}:boom"], strict=True
    ) as strict:
        strict(["p"], ["1"], answer=["1"])
    assert issubclass(RewardError, RuntimeError)


def test_rewards_in_a_thread(user_module: str) -> None:
    # Rollout workers may score from other threads: the limit does not need signals or the main thread.
    out: dict[str, object] = {}

    def run() -> None:
        with CombinedReward([f"{user_module}:spin", "exact_match"], timeout_s=0.5) as combined:
            out["result"] = combined(["p"], ["1"], answer=["1"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert out["result"].total == [1.0] and out["result"].timeouts == 1


def test_user_reward_import_errors_are_config_errors(user_module: str, tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="cannot import module 'nosuchmodule_xyz'"):
        CombinedReward(["nosuchmodule_xyz:fn"])
    with pytest.raises(ValueError, match="no callable 'missing'"):
        CombinedReward([f"{user_module}:missing"])
    _write_module(tmp_path, monkeypatch, "gradus_test_broken_reward", "raise RuntimeError('broken at import')\n")
    with pytest.raises(ValueError, match="broken at import"):
        CombinedReward(["gradus_test_broken_reward:fn"])
    with pytest.raises(ValueError, match="bad options"):
        CombinedReward([RewardSpec("countdown", 1.0, {"pattern": "x"})])
    with pytest.raises(ValueError, match="weight"):
        CombinedReward([RewardSpec("countdown", float("inf"))])


def test_pool_overhead_small() -> None:
    # One request per worker and call: scoring 512 completions with a reward that does nothing costs a few
    # milliseconds of pickling and IPC (about 2-4 ms measured here), small next to a training step
    # (0.2-1 s). Best of several repeats, to be robust on a busy machine.
    completions = [f"step by step ... so the answer is \\boxed{{{i}}}" * 4 for i in range(512)]
    answers = [str(i) for i in range(512)]
    with CombinedReward(["format"], workers=2) as combined:
        best = float("inf")
        for _ in range(10):
            start = time.perf_counter()
            result = combined(["p"] * 512, completions, answer=answers)
            best = min(best, time.perf_counter() - start)
    assert result.total == [1.0] * 512
    direct = get_reward("format")
    start = time.perf_counter()
    direct(["p"] * 512, completions)
    compute = time.perf_counter() - start
    assert best - compute < 0.05, f"pool overhead {1e3 * (best - compute):.1f} ms per call"


def test_overlong_penalty_as_a_reward_term():
    import torch

    from gradus.rewards.shaping import with_overlong_penalty

    # max_len 8, cache 4: free up to 4 tokens, then (4 - L) / 4, -1 past 8
    total, penalty = with_overlong_penalty([1.0, 1.0, 0.0, 0.5], torch.tensor([4, 6, 8, 9]), max_len=8, cache_len=4)
    assert penalty.tolist() == [0.0, -0.5, -1.0, -1.0]
    assert total.tolist() == [1.0, 0.5, -1.0, -0.5]
