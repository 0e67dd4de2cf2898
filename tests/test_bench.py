"""The pure pieces of bench/grpo_vs_trl.py, bench/efficiency.py and bench/rollout.py (neither TRL nor a worker
is started)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import efficiency  # noqa: E402
import grpo_vs_trl  # noqa: E402
import rollout as rollout_bench  # noqa: E402

from gradus.models import build_char_tokenizer  # noqa: E402


def test_digit_reward_by_hand():
    # "a1b2": 2 digits of 4 characters; "": no characters -> 0; "123": all digits.
    assert grpo_vs_trl.digit_reward(["p"] * 3, ["a1b2", "", "123"], answer=["0"] * 3) == [0.5, 0.0, 1.0]


@pytest.mark.parametrize("length", [24, 37])
def test_prompts_have_one_length_in_tokens(tmp_path, length):
    path = grpo_vs_trl.make_data_file(tmp_path, 20, length)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    prompts = [row["prompt"] for row in rows]
    tokenizer = build_char_tokenizer()
    assert len(set(prompts)) == 20
    # gradus strips prompts; TRL does not: the text must survive strip() unchanged.
    assert all(p == p.strip() for p in prompts)
    assert {len(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts} == {length}


def test_update_flops_by_hand():
    # P = 1000 of which head 200: 6 * 800 * 10 body tokens + 6 * 200 * 4 head tokens = 48000 + 4800.
    assert efficiency.update_flops(1000, 200, 10, 4) == 52_800


def test_summarize_medians_and_rates():
    steps = [
        {"seconds": s, "completion_tokens": 64 * 30, "gen_s": 0.1, "update_s": 0.2, "peak_rss_mib": m,
         "body_tokens": 10, "head_tokens": 5, "body_real": 9, "head_real": 4}
        for s, m in ((1.0, 500.0), (4.0, 520.0), (2.0, 510.0))
    ]
    out = grpo_vs_trl.summarize({"info": {"rss_mib": 400.0, "params": 7, "threads": 2}, "steps": steps}, rows=64)
    assert out["step_s"] == 2.0 and out["min_step_s"] == 1.0
    assert out["completions_per_s"] == 32.0  # 64 rows / median 2 s
    assert out["tokens_per_s"] == 64 * 30 / 2.0  # median of 1920/1, 1920/4, 1920/2
    assert out["mean_length"] == 30.0
    assert out["peak_rss_mib"] == 520.0 and out["step_mib"] == 120.0


def test_matmul_gflops_is_positive_and_restores_threads():
    import torch

    threads = torch.get_num_threads()
    rate = efficiency.matmul_gflops(64, repeats=2, threads=threads + 1)
    assert 0 < rate < float("inf")
    assert torch.get_num_threads() == threads


def test_rollout_bench_model_config_is_valid_and_nothing_stops_early():
    vocab, B, T = 30, 3, 5
    model = rollout_bench.build_model(vocab, 16, 1, 2)
    eos = model.config.eos_token_id
    assert eos is None or 0 <= eos < vocab  # transformers warns about an EOS id outside the vocabulary
    prompts = rollout_bench.make_prompts(B, vocab, seed=0)
    engine = rollout_bench.LocalEngine(model, pad_token_id=0, eos_token_ids=[vocab])
    assert rollout_bench.time_engine(engine, prompts, T, seed=0)[1] == B * T
    assert rollout_bench.time_generate(model, prompts, T, 0, 0, vocab)[1] == B * T
