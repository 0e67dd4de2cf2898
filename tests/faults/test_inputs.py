"""Data files, model folders and tokenizers that cannot work as given: each is either made to work the
way a user expects (a small file gets a held-out share that fits it) or refused with a message that names
the file, the row or the tensor, before any work. Every case here failed on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings

import pytest
import torch
from conftest import write_digits_reward
from train.conftest import tiny_overrides

from gradus.cli import main
from gradus.config import ConfigError, load_config
from gradus.models import ModelLoadError, load_pretrained, lora, save_pretrained
from gradus.rollout import LocalEngine, SamplingParams
from gradus.tasks import DatasetError, FileTask
from gradus.train import bootstrap


def _rows(n: int, long_rows: tuple[int, ...] = ()) -> list[dict]:
    """n distinct sums; the 1-based rows in ``long_rows`` get a 600-character prompt (the nano model has 512
    positions)."""
    return [{"question": f"{i}+{i}=" + ("1" * 600 if i + 1 in long_rows else ""), "answer": str(2 * i)}
            for i in range(n)]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _file_cfg(path, *extra: str):
    return load_config(overrides=["task.name=file", f"task.data_file={path}", *extra])


def _train(nano, tmp_path, data, **extra) -> int:
    # a reward that pays for digits: an untrained model's groups differ, so a run that gets to train learns (one
    # that learned from no token exits 1)
    write_digits_reward(tmp_path, "input_rewards")
    sys.path.insert(0, str(tmp_path))
    args = tiny_overrides(nano, tmp_path, **{"task.heldout_size": 500, "task.rewards": "input_rewards:digits:0.5,"
                                             "exact_match", **extra})
    return main(["train", "--data", str(data), "--name", "run", *args])


def _copy_model(nano, tmp_path, name: str):
    copy = tmp_path / name
    shutil.copytree(nano, copy)
    return copy


def _edit_json(path, **changes) -> None:
    """Set (or, with None, remove) top-level keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# ---- files too small (or large) for task.heldout_size ------------------------------------------------

def test_small_file_trains_with_a_heldout_share_that_fits_and_says_so(nano_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    _jsonl(data, _rows(40))
    with pytest.warns(UserWarning, match="held-out accuracy on 8 problem"):
        assert _train(nano_dir, tmp_path, data) == 0  # default task.heldout_size=500
    err = capsys.readouterr().err
    assert "data.jsonl: 40 distinct prompts; held out 8 (20%), training on 32 (asked for 500" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["heldout_n"] == 8


def test_warm_start_on_a_file_says_the_split_once(tmp_path, capsys):
    """`gradus sft --data` with the built-in model: the warm start builds the task again and once said the
    split a second time."""
    data = _jsonl(tmp_path / "data.jsonl", _rows(40))
    with pytest.warns(UserWarning, match="means little"):
        assert main(["sft", "--data", data, "--output", str(tmp_path / "out"), "--no-progress", "sft.steps=2",
                     "sft.batch_size=4", "model.tiny_size=nano", f"run.cache_dir={tmp_path / 'cache'}"]) == 0
    assert capsys.readouterr().err.count("data.jsonl: 40 distinct prompts; held out 8") == 1


def test_large_file_holds_out_heldout_size_and_trains_on_the_rest(tmp_path):
    path = _jsonl(tmp_path / "big.jsonl", _rows(3000))
    task = bootstrap.build_task(_file_cfg(path, f"run.cache_dir={tmp_path}"))
    held = task.heldout(500)
    assert len(held) == 500 and task.num_train == 2500
    assert not {ex.prompt for ex in held} & {task.train_example(i).prompt for i in range(2500)}
    assert task.split_note == "big.jsonl: 3000 distinct prompts; held out 500 (17%), training on 2500"
    # the split depends on the file and split_seed only, not on the run's seed
    again = bootstrap.build_task(_file_cfg(path, "run.seed=7", f"run.cache_dir={tmp_path}"))
    assert again.heldout(500) == held


def test_tiny_files(tmp_path):
    three = _jsonl(tmp_path / "three.jsonl", _rows(3))
    with pytest.warns(UserWarning, match="means little"):
        task = bootstrap.build_task(_file_cfg(three))
    assert len(task.heldout(500)) == 1 and task.num_train == 2
    one = _jsonl(tmp_path / "one.jsonl", _rows(1) * 5)
    with pytest.raises(ConfigError, match="only 1 distinct prompt; a run needs at least 2"):
        bootstrap.build_task(_file_cfg(one))


# ---- prompts longer than the model's positions -------------------------------------------------------

def test_long_prompts_refused_naming_file_and_row(nano_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    _jsonl(data, _rows(40, long_rows=(3, 17)))
    assert _train(nano_dir, tmp_path, data) == 2
    err = capsys.readouterr().err
    assert "2 row(s) of" in err and "too long for the model" in err
    assert f"{data}: row 3 (line 3): a prompt of 604 tokens + rollout.max_new_tokens=6" in err
    assert "512 positions" in err and err.index("row 3 (line 3)") < err.index("row 17 (line 17)")  # file order
    assert main(["eval", "--model", str(nano_dir), "--data", str(data), "--k", "0"]) == 2


def test_long_prompts_skipped_with_on_error_skip(nano_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    _jsonl(data, _rows(40, long_rows=(3, 17)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(nano_dir, tmp_path, data, **{"task.on_error": "skip"}) == 0
    assert any("skipped 2 row(s)" in str(w.message) and "row 3 (line 3)" in str(w.message) for w in caught)
    assert "then skipped 2 row(s) that are too long for the model" in capsys.readouterr().err


def test_long_prompts_among_the_held_out_and_first_batch_are_skipped_too(nano_dir, tmp_path, capsys):
    """Half the rows too long: some are held out and some in the first batch, and skip still skips them all
    (the early check before any warm start once refused these, whatever task.on_error said)."""
    data = tmp_path / "long.jsonl"
    _jsonl(data, _rows(40, long_rows=tuple(range(1, 41, 2))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _train(nano_dir, tmp_path, data, **{"task.on_error": "skip"}) == 0
    assert "then skipped 20 row(s) that are too long for the model" in capsys.readouterr().err


def test_eval_holds_out_only_rows_that_fit(nano_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    _jsonl(data, _rows(40, long_rows=tuple(range(1, 41, 2))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "--model", str(nano_dir), "--data", str(data), "--k", "0", "--json",
                     "task.on_error=skip", "rollout.max_new_tokens=4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] >= 1


def test_engine_refuses_prompts_past_the_positions_before_allocating(nano_dir):
    model, tok = load_pretrained(nano_dir)
    engine = LocalEngine(model, pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id])
    with pytest.raises(ValueError, match="600 tokens \\+ max_new_tokens 8 is more than the model's 512"):
        engine.generate([[5] * 600], 2, SamplingParams(temperature=1.0, max_new_tokens=8))
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=512 leaves no room"):
        bootstrap.check_prompt_lengths(None, tok, model, load_config(overrides=["rollout.max_new_tokens=512"]))


# ---- files that are not UTF-8 ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_invalid_utf8_named_by_line_and_byte_and_skipped(tmp_path, kind):
    lines = [json.dumps(r) for r in _rows(20)] if kind == "jsonl" else (
        ["question,answer"] + [f"{r['question']},{r['answer']}" for r in _rows(20)])
    raw = [line.encode() + b"\n" for line in lines]
    raw[5] = raw[5].replace(b"=", b"=\xff\xfe", 1)  # line 6
    path = tmp_path / f"bad.{kind}"
    path.write_bytes(b"".join(raw))
    offset = sum(len(r) for r in raw[:5]) + raw[5].index(b"\xff")
    with pytest.raises(DatasetError, match=f"line 6 \\(byte {offset}\\): not valid UTF-8") as info:
        FileTask(path, cache_dir=str(tmp_path))
    assert str(path) in str(info.value)
    with pytest.warns(UserWarning, match="line 6"):
        task = FileTask(path, on_error="skip", heldout_fraction=0.0, cache_dir=str(tmp_path))
    assert task.num_train == 19
    assert "=\ufffd" not in "".join(task.train_example(i).prompt for i in range(19))


# ---- model folders: truncated weights, NaN weights -----------------------------------------------------

def test_truncated_safetensors_named_in_train_eval_and_load(nano_dir, tmp_path, capsys):
    cut = _copy_model(nano_dir, tmp_path, "cut")
    weights = cut / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    assert main(["eval", "--model", str(cut), "--task", "arithmetic", "--k", "0", "--n", "2"]) == 2
    assert f"{weights} is truncated" in capsys.readouterr().err
    assert main(["train", *tiny_overrides(cut, tmp_path), "--task", "arithmetic"]) == 2
    assert "re-download or re-save" in capsys.readouterr().err
    # what a resumed run does with its checkpoint's policy/
    with pytest.raises(ConfigError, match="is truncated"):
        lora.load_model(cut, load_config().model.dtype, torch.device("cpu"))
    os.truncate(weights, 5)
    with pytest.raises(ModelLoadError, match="not even a header"):
        load_pretrained(cut)


def test_nan_weights_named(nano_dir, tmp_path, capsys):
    model, tok = load_pretrained(nano_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        model.model.norm.weight[1] = float("inf")
    bad = save_pretrained(model, tok, tmp_path / "nan")
    assert main(["eval", "--model", str(bad), "--task", "arithmetic", "--k", "0", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "2 weight tensor(s) hold NaN or inf: model.layers.0.mlp.up_proj.weight, model.norm.weight" in err


# ---- tokenizers without EOS (and PAD) ----------------------------------------------------------------

def test_tokenizer_without_eos_warns_and_without_pad_too_errors(nano_dir, tmp_path, capsys):
    no_eos = _copy_model(nano_dir, tmp_path, "no_eos")
    _edit_json(no_eos / "tokenizer_config.json", eos_token=None)
    _edit_json(no_eos / "generation_config.json", eos_token_id=None)
    args = ["eval", "--model", str(no_eos), "--task", "arithmetic", "--k", "0", "--n", "2", "--json"]
    with pytest.warns(UserWarning, match="no EOS token the model can emit .* every completion runs to "
                                         "rollout.max_new_tokens"):
        assert main(args) == 0
    _edit_json(no_eos / "tokenizer_config.json", pad_token=None)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no EOS and no PAD token" in err and '"eos_token"' in err and "tokenizer_config.json" in err
