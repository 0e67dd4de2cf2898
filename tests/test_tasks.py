"""Tests of gradus.tasks: determinism, held-out disjointness, difficulty, prompts, file loading."""

from __future__ import annotations

import json
import warnings

import pytest

from gradus.rewards import get_reward
from gradus.tasks import (
    ArithmeticTask,
    CountdownTask,
    DatasetError,
    Example,
    FileTask,
    available_tasks,
    get_task,
    math_word_problems_path,
    reward_fields,
)
from gradus.tasks.arithmetic import evaluate


def test_registry_is_strict() -> None:
    assert isinstance(get_task("arithmetic", seed=3), ArithmeticTask)
    with pytest.raises(ValueError, match="arithmetic.*countdown"):
        get_task("arithmetc")
    assert {"arithmetic", "countdown", "file", "math_file"} <= set(available_tasks())


@pytest.mark.parametrize(
    "make", [lambda s: ArithmeticTask(seed=s), lambda s: CountdownTask(seed=s, num_numbers=4)]
)
def test_train_stream_is_a_function_of_seed_and_index(make) -> None:
    a, b, c = make(7), make(7), make(8)
    stream_a = [a.train_example(i) for i in range(50)]
    # Same seed, indices visited in another order (as a resumed trainer would): same examples.
    assert [b.train_example(i) for i in reversed(range(50))][::-1] == stream_a
    assert [c.train_example(i) for i in range(50)] != stream_a
    assert len({ex.prompt for ex in stream_a}) > 40  # not one problem repeated


@pytest.mark.parametrize(
    "task",
    [ArithmeticTask(difficulty=1), ArithmeticTask(difficulty=2), CountdownTask(num_numbers=3)],
    ids=["arith1", "arith2", "countdown"],
)
def test_heldout_disjoint_from_train(task) -> None:
    held = task.heldout()
    assert held, "held-out set is empty"
    held_keys = {task.problem_key(ex) for ex in held}
    assert len(held_keys) == len(held)  # distinct
    train_keys = {task.problem_key(task.train_example(i)) for i in range(3000)}
    assert not held_keys & train_keys
    assert task.heldout() == held  # fixed
    assert task.heldout(5) == held[:5]


def test_small_problem_space_heldout() -> None:
    # Difficulty 1 has 10*10*2 = 200 problems: about 10% are held out, so asking for 200 must fail clearly.
    task = ArithmeticTask(difficulty=1)
    assert 5 <= len(task.heldout()) <= 40
    with pytest.raises(ValueError, match="held-out"):
        task.heldout(150)


def test_arithmetic_answers_are_correct() -> None:
    task = ArithmeticTask(difficulty=5)
    for i in range(200):
        ex = task.train_example(i)
        assert ex.prompt.endswith("=")
        # eval is fine on our own generated, trusted text: it is an independent oracle for precedence.
        assert int(ex.answer) == eval(ex.prompt[:-1])
    assert evaluate([2, 3, 4], "+*") == 14
    assert evaluate([2, 3, 4], "*-") == 2
    assert evaluate([7, 12], "-") == -5


def test_difficulty_changes_answer_lengths() -> None:
    mean_len = {}
    for level in (1, 2, 4, 6):
        task = ArithmeticTask(difficulty=level)
        answers = [task.train_example(i).answer for i in range(300)]
        mean_len[level] = sum(len(a) for a in answers) / len(answers)
        assert len({len(a) for a in answers}) >= 2, "answers should vary in length"
    assert mean_len[1] < mean_len[2] < mean_len[4] < mean_len[6]
    with pytest.raises(ValueError, match="difficulty"):
        ArithmeticTask(difficulty=99)


def test_arithmetic_default_reward_scores_reference() -> None:
    task = ArithmeticTask()
    batch = task.train_batch(0, 20)
    reward = get_reward(task.default_reward)
    fields = reward_fields(batch)
    assert reward([e.prompt for e in batch], [e.answer for e in batch], **fields) == [1.0] * 20
    wrong = [str(int(e.answer) + 1) for e in batch]
    assert reward([e.prompt for e in batch], wrong, **fields) == [0.0] * 20


@pytest.mark.parametrize("num_numbers", [3, 4])
def test_countdown_instances_are_solvable(num_numbers: int) -> None:
    task = CountdownTask(seed=1, num_numbers=num_numbers, max_number=25)
    batch = task.train_batch(0, 100) + task.heldout(20)
    fields = reward_fields(batch)
    assert set(fields) == {"answer", "numbers", "target"}
    scores = get_reward(task.default_reward)([e.prompt for e in batch], [e.answer for e in batch], **fields)
    assert scores == [1.0] * len(batch)
    for ex in batch:
        assert len(ex.meta["numbers"]) == num_numbers
        assert ex.prompt == " ".join(map(str, ex.meta["numbers"])) + f" -> {ex.meta['target']}:"
        assert all(1 <= n <= 25 for n in ex.meta["numbers"])


def _chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(["<unk>", *"abcdefghijklmnopqrstuvwxyz0123456789+-=<>|:/ "])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    return fast


def test_render_prompt_with_and_without_chat_template() -> None:
    task = ArithmeticTask()
    ex = Example(prompt="12+345=", answer="357")
    tokenizer = _chat_tokenizer()
    assert task.render_prompt(ex) == "12+345="
    assert task.render_prompt(ex, tokenizer) == "12+345="  # no chat template: plain prompt
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert task.render_prompt(ex, tokenizer) == "<|user|>12+345=\n<|assistant|>"
    math = get_task("math_file")
    word = math.train_example(0)
    assert math.render_prompt(word, tokenizer) == (
        f"<|user|>{word.prompt}\nPut the final answer in \\boxed{{}}.\n<|assistant|>"
    )


ROWS = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(20)]


def _write(tmp_path, kind: str, rows: list[dict]) -> str:
    import pandas as pd

    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_file_task_loads_and_splits(tmp_path, kind: str) -> None:
    path = _write(tmp_path, kind, ROWS)
    task = FileTask(
        path, template="Q: {prompt} \\boxed{}", heldout_fraction=0.25, seed=3, cache_dir=str(tmp_path)
    )
    held = task.heldout()
    assert len(held) == 5 and task.num_train == 15
    train_prompts = {task.train_example(i).prompt for i in range(15)}
    assert len(train_prompts) == 15  # one epoch is a permutation: every row once
    assert not train_prompts & {ex.prompt for ex in held}
    all_rows = {(r["question"], r["answer"]) for r in ROWS}
    assert {(ex.prompt, ex.answer) for ex in held} | {
        (task.train_example(i).prompt, task.train_example(i).answer) for i in range(15)
    } == all_rows
    # Each epoch has its own order, fixed by (seed, epoch).
    epoch0 = [task.train_example(i).prompt for i in range(15)]
    epoch1 = [task.train_example(i).prompt for i in range(15, 30)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again = FileTask(path, heldout_fraction=0.25, seed=3, cache_dir=str(tmp_path))
    assert [again.train_example(i) for i in range(30)] == [task.train_example(i) for i in range(30)]
    assert again.heldout() == held
    assert task.render_prompt(held[0]) == f"Q: {held[0].prompt} \\boxed{{}}"


def test_file_task_separate_heldout_file(tmp_path) -> None:
    train = _write(tmp_path, "jsonl", ROWS)
    held_path = tmp_path / "held.jsonl"
    held_path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"question": "new?", "answer": 1}) + "\n")
    with pytest.warns(UserWarning, match="dropped 1 training rows"):
        task = FileTask(train, heldout_path=held_path, cache_dir=str(tmp_path))
    assert [ex.prompt for ex in task.heldout()] == [ROWS[0]["question"], "new?"]
    assert task.heldout()[1].answer == "1"
    assert task.num_train == 19


BAD_ROWS = [
    {"question": "ok one", "answer": "1"},
    {"answer": "2"},  # row 2: missing question
    {"question": "   ", "answer": "3"},  # row 3: empty prompt
    {"question": "ok four", "answer": "4"},
    {"question": ["not", "text"], "answer": "5"},  # row 5: wrong type
    {"question": "ok six", "answer": None},  # row 6: missing answer
]


def test_bad_rows_raise_with_file_and_row(tmp_path) -> None:
    path = _write(tmp_path, "jsonl", BAD_ROWS)
    with pytest.raises(DatasetError) as info:
        FileTask(path, cache_dir=str(tmp_path))
    message = str(info.value)
    assert "4 bad row(s)" in message and path in message
    for row, why in [
        (2, "missing field 'question'"),
        (3, "empty prompt"),
        (5, "field 'question' must be a string, got list"),
        (6, "missing field 'answer'"),
    ]:
        assert f"row {row} (line {row}): {why}" in message


def test_bad_rows_skipped_with_warning(tmp_path) -> None:
    path = _write(tmp_path, "jsonl", BAD_ROWS)
    with pytest.warns(UserWarning, match=r"skipped 4 bad row\(s\)") as record:
        task = FileTask(path, on_error="skip", heldout_fraction=0.0, cache_dir=str(tmp_path))
    assert "row 2" in str(record[0].message)
    assert sorted(task.train_example(i).prompt for i in range(2)) == ["ok four", "ok one"]
    assert task.num_train == 2


def test_invalid_json_line_named(tmp_path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DatasetError, match=r"line 3: invalid JSON"):
        FileTask(path, cache_dir=str(tmp_path))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        task = FileTask(path, on_error="skip", heldout_fraction=0.0, cache_dir=str(tmp_path))
    assert task.num_train == 2


def test_empty_and_unusable_files(tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        FileTask(empty)
    with pytest.raises(DatasetError, match="no column"):
        FileTask(_write(tmp_path, "csv", ROWS), prompt_field="problem", cache_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="unknown file type"):
        FileTask(tmp_path / "x.txt")
    only_bad = _write(tmp_path, "jsonl", [{"question": "", "answer": "1"}])
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no usable rows"):
        FileTask(only_bad, on_error="skip", cache_dir=str(tmp_path))


def test_csv_keeps_answers_as_text(tmp_path) -> None:
    rows = [
        {"question": "a?", "answer": "007"},
        {"question": "b?", "answer": "1/2"},
        {"question": "c?", "answer": "3"},
    ]
    task = FileTask(_write(tmp_path, "csv", rows), heldout_fraction=0.0, cache_dir=str(tmp_path))
    assert sorted(task.train_example(i).answer for i in range(3)) == ["007", "1/2", "3"]


def test_shipped_word_problems_are_consistent() -> None:
    rows = [json.loads(line) for line in math_word_problems_path().read_text().splitlines()]
    assert 60 <= len(rows) <= 100
    assert len({r["question"] for r in rows}) == len(rows)
    reward = get_reward("math_equivalent")
    # Each worked solution ends in \boxed{...} and that boxed value equals the answer field.
    assert all(r["solution"].rstrip(".").endswith("}") and "\\boxed{" in r["solution"] for r in rows)
    scores = reward(
        [r["question"] for r in rows], [r["solution"] for r in rows], answer=[r["answer"] for r in rows]
    )
    assert scores == [1.0] * len(rows)
    task = get_task("math_file")
    assert task.default_reward == "math_equivalent"
    assert task.num_train + len(task.heldout()) == len(rows)
