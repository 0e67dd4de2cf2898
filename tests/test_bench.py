"""The pure pieces of bench/grpo_vs_trl.py, bench/efficiency.py, bench/rollout.py, bench/data_parallel.py and
bench/lora.py, bench/train_table.py, bench/learning_vs_trl.py (neither TRL nor a worker nor a training run is
started; the one test that builds TRL's config skips without TRL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import data_parallel  # noqa: E402
import efficiency  # noqa: E402
import grpo_vs_trl  # noqa: E402
import learning_report  # noqa: E402
import learning_settings  # noqa: E402
import learning_vs_trl  # noqa: E402
import lora as lora_bench  # noqa: E402
import rollout as rollout_bench  # noqa: E402
import train_table  # noqa: E402

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


def test_matmul_floor_flops_by_hand():
    import torch

    threads = torch.get_num_threads()
    # A body Linear 4 -> 3 and a head 3 -> 5; 14 body and 4 head positions over 2 updates, so 7 and 2 a update.
    # Per Linear and update, forward + input grad + weight grad = 3 matmuls of 2 * T * in * out FLOPs:
    # 2 updates x (3 * 2 * 7 * 4 * 3 + 3 * 2 * 2 * 3 * 5) = 2 x (504 + 180) = 1368.
    seconds, flops = efficiency.matmul_floor([(4, 3, False), (3, 5, True)], 14, 4, updates=2, repeats=2,
                                             threads=threads + 1)
    assert flops == 1368
    assert 0 < seconds < float("inf")
    assert torch.get_num_threads() == threads


def test_linear_shapes_name_every_projection_and_the_head(micro_dir):
    import json

    cfg = json.loads((Path(micro_dir) / "config.json").read_text())
    shapes = efficiency.linear_shapes(str(micro_dir))
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    assert len(shapes) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert [s for s in shapes if s[2]] == [(h, cfg["vocab_size"], True)]
    assert (h, i, False) in shapes and (i, h, False) in shapes


def test_rollout_bench_model_config_is_valid_and_nothing_stops_early():
    vocab, B, T = 30, 3, 5
    model = rollout_bench.build_model(vocab, 16, 1, 2)
    eos = model.config.eos_token_id
    assert eos is None or 0 <= eos < vocab  # transformers warns about an EOS id outside the vocabulary
    prompts = rollout_bench.make_prompts(B, vocab, seed=0)
    engine = rollout_bench.LocalEngine(model, pad_token_id=0, eos_token_ids=[vocab])
    assert rollout_bench.time_engine(engine, prompts, T, seed=0)[1] == B * T
    assert rollout_bench.time_generate(model, prompts, T, 0, 0, vocab)[1] == B * T


def _step(seconds: float, gen: float, tokens: float = 4000.0, **extra) -> dict[str, float]:
    return {"time/step_seconds": seconds, "rollout/gen_seconds": gen, "rollout/tokens": tokens,
            "time/threads": 1.0, "rollout/length_mean": tokens / 512, "reward/mean": 0.1, **extra}


def test_data_parallel_summary_skips_the_first_step_and_busy_steps():
    # step 1 (9 s) warms up; step 3 (5 s) ran while other work took 1.1 cores; left: 2 s and 4 s -> median 3 s
    steps = [_step(9.0, 1.0), _step(2.0, 0.5), _step(5.0, 0.5), _step(4.0, 1.5)]
    out = data_parallel.summarize(steps, completions_per_step=512, others=[0.0, 0.1, 1.1, 0.2])
    assert out["step_s"] == 3.0 and out["steps_per_s"] == pytest.approx(1 / 3)
    assert out["completions_per_s"] == pytest.approx(512 / 3)
    assert out["tokens_per_s"] == pytest.approx((2000 + 1000) / 2)  # median of 4000/2 and 4000/4
    assert out["gen_s"] == 1.0 and out["rest_s"] == 2.0  # medians of (0.5, 1.5) and (1.5, 2.5)
    assert (out["quiet_steps"], out["timed_steps"]) == (2, 3)
    # no quiet step: every step after the first counts
    assert data_parallel.summarize(steps, 512, others=[2.0] * 4)["step_s"] == 4.0
    with pytest.raises(ValueError):
        data_parallel.summarize(steps[:1], 512)


def test_same_rollouts_per_step():
    a = [_step(1, 0, tokens=4157), _step(1, 0, tokens=4078)]
    b = [_step(1, 0, tokens=4157), _step(1, 0, tokens=4080)]
    assert data_parallel.same_rollouts(a, b) == [True, False]


def test_load_monitor_gives_each_step_the_other_work_beside_it():
    monitor = data_parallel.LoadMonitor([0], Path("unused"))
    # (wall, machine busy s, ours s, metrics lines): the evaluation line at t=1, step 1 ends at t=3
    # (busy 4 s, ours 3 s -> others 0.5 core), step 2 at t=4 (busy 2 s, ours 2 s -> 0)
    monitor.samples = [(0.0, 0.0, 0.0, 0), (1.0, 1.0, 1.0, 1), (3.0, 5.0, 4.0, 2), (4.0, 7.0, 6.0, 3)]
    assert monitor.per_step() == [0.5, 0.0]


def test_tree_cpu_finds_this_process_and_its_child():
    import os
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        found = data_parallel.tree_cpu(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert {os.getpid(), child.pid} <= set(found) and all(cpu >= 0 for cpu in found.values())


def test_data_parallel_commands():
    one, two = data_parallel.CASES[0], data_parallel.CASES[2]
    assert data_parallel.command(one, ["run.steps=2"])[1:] == ["-m", "gradus", "train", "run.steps=2",
                                                               "run.threads=2", "run.parallel=ddp"]
    cmd = data_parallel.command(two, [])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert cmd[-2:] == ["run.threads=1", "run.parallel=fsdp2"]


def test_lora_summary_by_hand():
    result = {
        "steps": [{"step_s": 9.0, "gen_s": 3.0, "tokens": 8192, "threads": 2, "others_cores": 0.0},
                  {"step_s": 2.0, "gen_s": 0.5, "tokens": 8192, "threads": 2, "others_cores": 0.0},
                  {"step_s": 7.0, "gen_s": 4.0, "tokens": 8192, "threads": 2, "others_cores": 0.9},
                  {"step_s": 3.0, "gen_s": 1.5, "tokens": 8192, "threads": 2, "others_cores": 0.1}],
        "peak_rss_mib": 1500.0, "rss_built_mib": 400.0, "step_mib": 1100.0, "torch_step_mib": 700.0,
        "fast_decoder": False, "phase_growth_mib": {"sample": 50.0, "update": 900.0},
        "state": {"weights": 3.0, "reference": 0.0, "grads": 0.5, "optimizer": 1.0, "params": 9, "trainable": 2},
    }
    out = lora_bench.summarize(result)
    assert out["step_s"] == 2.5 and out["gen_s"] == 1.0 and out["rest_s"] == 1.5  # steps 2 and 4
    assert (out["quiet_steps"], out["timed_steps"]) == (2, 3)
    assert out["state_mib"] == 4.5 and out["prepare_mib"] == 0.0 and out["update_mib"] == 900.0


def test_profiled_peak_counts_what_torch_held_at_once():
    import torch

    def work():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)  # 4 MiB more while a is alive
        del a, b
        torch.ones(1 << 19)  # 2 MiB after both are freed: not a new peak

    assert 8.0 <= lora_bench.profiled_peak_mib(work) < 8.5


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_phase_peaks_see_a_transient_allocation():
    phases = lora_bench.PhasePeaks()

    def allocate():
        block = bytearray(64 << 20)  # zero-filled: every page is touched
        return len(block)

    assert phases.wrap("work", allocate)() == 64 << 20
    assert 60 <= phases.growth["work"] < 200


def test_train_table_summary_by_hand():
    rows = [{"algo": "grpo", "seed": 0, "before": 0.2, "after": 0.36, "gain": 16.0, "steps": 1500, "rl_wall_s": 300.0},
            {"algo": "grpo", "seed": 1, "before": 0.1, "after": 0.30, "gain": 20.0, "steps": 1500, "rl_wall_s": 100.0},
            {"algo": "grpo", "seed": 2, "before": 0.15, "after": 0.27, "gain": 12.0, "steps": 1500, "rl_wall_s": 200.0},
            {"algo": "ppo", "seed": 0, "failed": 1}]
    header, rule, grpo, ppo = train_table.summarize(["grpo", "ppo"], rows)
    # before: (0.2 + 0.1 + 0.15) / 3 = 0.15; after: (0.36 + 0.30 + 0.27) / 3 = 0.31; gain mean (16 + 20 + 12) / 3 = 16
    assert grpo == "| grpo | 3 | 1500 | 0.150 | 0.310 | +16.0 | +12.0 | +20.0 | 200 s |"
    assert ppo == "| ppo | 0 done, 1 failed | | | | | | | |"
    assert header.count("|") == rule.count("|") == grpo.count("|")
    assert train_table.cpu_model()


def test_train_table_reuses_a_kept_run_only_when_it_is_the_run_the_table_would_start(tmp_path, capsys):
    import argparse

    from gradus.algorithm import resolved_config
    from gradus.config import load_config, save_config

    run = tmp_path / "dapo-seed0"
    run.mkdir()
    # what `gradus train --algo dapo run.seed=0 --out X --name dapo-seed0 run.threads=1` saves
    kept = load_config(overrides=["algo.name=dapo", "run.seed=0", f"run.out_dir={tmp_path}", "run.name=dapo-seed0",
                                  "run.threads=1", "run.progress=false"])
    save_config(resolved_config(kept), run / "config.yaml")
    assert train_table.config_drift(run, "dapo", 0, []) == []  # threads, progress and the folder do not count
    assert train_table.config_drift(run, "dapo", 0, ["optim.lr=1e-3"]) == ["optim.lr (kept 0.0002, now 0.001)"]
    assert train_table.config_drift(run, "dapo", 1, []) == ["run.seed (kept 0, now 1)"]
    (run / "summary.json").write_text(json.dumps({"heldout_accuracy_before": 0.1, "heldout_accuracy_after": 0.3,
                                                  "steps": 2, "wall_time_s": 1.0}))
    args = argparse.Namespace(out=str(tmp_path), jobs=1, overrides=[])
    assert train_table.run_one("dapo", 0, args)["gain"] == pytest.approx(20.0)
    args.overrides = ["rollout.group_size=4"]  # a table of other settings must not count the kept run
    row = train_table.run_one("dapo", 0, args)
    assert row["failed"] == "config differs: rollout.group_size (kept 8, now 4)"
    assert "Delete that folder" in capsys.readouterr().err


# ---- bench/learning_vs_trl.py -------------------------------------------------------------------
def _curve(*points: tuple[int, float, float]) -> list[dict[str, float]]:
    return [{"step": s, "train_s": t, "accuracy": a} for s, t, a in points]


def test_learning_measures_by_hand():
    # gradus: 0.142 at 0 s, 0.250 at 10 s (+10.8 points), 0.300 at 20 s, 0.368 at 40 s (its end)
    # TRL:    0.142 at 0 s, 0.200 at 15 s, 0.302 at 30 s (+16 points, its end)
    gradus = _curve((0, 0.0, 0.142), (50, 10.0, 0.250), (100, 20.0, 0.300), (200, 40.0, 0.368))
    trl = _curve((0, 0.0, 0.142), (50, 15.0, 0.200), (100, 30.0, 0.302))
    m = learning_report.seed_measures({"gradus": gradus, "trl": trl})
    assert m["gradus"]["to_plus10_s"] == 10.0  # 0.250 >= 0.142 + 0.10; 0.242 would not be
    assert m["trl"]["to_plus10_s"] == 30.0  # 0.200 is not; 0.302 is
    # TRL's final 0.302: gradus' 0.300 at 20 s falls short, 0.368 at 40 s reaches it; TRL reaches it at its end
    assert m["gradus"]["to_trl_final_s"] == 40.0 and m["trl"]["to_trl_final_s"] == 30.0
    # at TRL's end (30 s) gradus' last evaluation is the one at 20 s
    assert m["gradus"]["acc_at_trl_end"] == 0.300 and m["trl"]["acc_at_trl_end"] == 0.302
    assert m["gradus"]["final"] == 0.368 and m["gradus"]["steps"] == 200 and m["gradus"]["s_per_step"] == 0.2
    # exactly +10 points counts (as counts out of 500: 54 -> 104), though 0.108 + 0.10 > 0.208 in floats
    assert learning_report.first_time_at(_curve((0, 0.0, 0.108), (5, 3.0, 0.208)), 0.108 + 0.10) == 3.0
    assert learning_report.first_time_at(trl, 0.5) is None


def test_learning_summary_over_seeds_by_hand():
    per_seed = {
        0: learning_report.seed_measures({"gradus": _curve((0, 0.0, 0.1), (10, 5.0, 0.3)),
                                          "trl": _curve((0, 0.0, 0.1), (10, 10.0, 0.2))}),
        1: learning_report.seed_measures({"gradus": _curve((0, 0.0, 0.2), (10, 6.0, 0.25)),
                                          "trl": _curve((0, 0.0, 0.2), (10, 8.0, 0.4))}),
    }
    s = learning_report.row_summary(per_seed)
    # gradus' +10 points: seed 0 at 5 s (0.3 >= 0.2), seed 1 never (0.25 < 0.3): 1 of 2
    assert s["gradus"]["to_plus10_s"] == {"mean": 5.0, "min": 5.0, "max": 5.0, "n": 1, "of": 2}
    assert s["trl"]["final"]["mean"] == pytest.approx(0.3) and s["trl"]["train_s"]["max"] == 10.0
    r = learning_report.ratio_summary(per_seed)
    assert r["train_s"]["mean"] == pytest.approx((5 / 10 + 6 / 8) / 2)
    lines = learning_report.summary_table({"dapo": per_seed})
    assert "| dapo | gradus | 2 | 0.150 (0.100–0.200) |" in lines[2] and "5 (5–5), 1 of 2" in lines[2]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    seeds = learning_report.per_seed_table({"dapo": per_seed})
    assert len(seeds) == 2 + 2 * 2 and all(line.count("|") == seeds[0].count("|") for line in seeds)


def test_learning_mean_band_interpolates_on_the_shortest_curve():
    a = _curve((0, 0.0, 0.0), (1, 10.0, 1.0))
    b = _curve((0, 0.0, 0.2), (1, 4.0, 0.2), (2, 20.0, 0.6))
    grid, mean, lo, hi = learning_report.mean_band([a, b], "train_s", grid_points=3)
    # grid 0, 5, 10 s; a: 0, 0.5, 1; b: 0.2, 0.2 + 0.4 * 1/16, 0.2 + 0.4 * 6/16
    assert list(grid) == [0.0, 5.0, 10.0]
    assert list(mean) == pytest.approx([0.1, (0.5 + 0.225) / 2, (1.0 + 0.35) / 2])
    assert list(lo) == pytest.approx([0.0, 0.225, 0.35]) and list(hi) == pytest.approx([0.2, 0.5, 1.0])


def test_learning_trl_settings_mirror_the_presets():
    def mirror(row):
        return learning_settings.trl_kwargs(learning_settings.row_config(
            learning_settings.row_overrides(row, 3, None, 1, "cpu", None)))

    dapo, grpo = mirror("dapo"), mirror("grpo")
    assert (dapo["loss_type"], dapo["epsilon"], dapo["epsilon_high"], dapo["beta"]) == ("dapo", 0.2, 0.28, 0.0)
    assert (grpo["loss_type"], grpo["epsilon"], grpo["epsilon_high"], grpo["beta"]) == ("grpo", 0.2, 0.2, 0.04)
    assert (dapo["max_steps"], grpo["max_steps"], dapo["seed"]) == (1000, 1500, 3)  # each preset's steps
    assert dapo["per_device_train_batch_size"] == 16 * 8 and dapo["num_generations"] == 8
    assert (dapo["adam_beta1"], dapo["adam_beta2"], dapo["lr_scheduler_kwargs"]) == (0.9, 0.99, {"min_lr_rate": 0.1})
    assert dapo["shuffle_dataset"] is False and dapo["scale_rewards"] == "group"
    for bad in ("algo.agg=seq-mean-token-sum-norm", "optim.schedule=linear", "algo.advantage=rloo"):
        cfg = learning_settings.row_config(["algo.name=grpo", bad])
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            learning_settings.trl_kwargs(cfg)


def test_learning_rate_schedules_differ_by_one_step_of_the_cosine():
    import math

    cfg = learning_settings.row_config(["algo.name=dapo"])  # 1000 steps, 5 of warm-up, cosine to 10%
    # the same warm-up; after it TRL's cosine is one step ahead: |cos(x) - cos(x + d)| <= 2 sin(d / 2), d = pi/995,
    # scaled by (1 - 0.1) / 2, the largest where the cosine is steepest (mid-run)
    assert learning_settings.lr_gap(cfg) == pytest.approx(0.45 * 2 * math.sin(math.pi / 995 / 2), rel=1e-4)


def test_learning_trl_config_takes_the_settings(tmp_path):
    pytest.importorskip("trl")
    from trl import GRPOConfig

    cfg = learning_settings.row_config(learning_settings.row_overrides("dapo", 0, 20, 1, "cpu", None))
    args = GRPOConfig(**learning_settings.trl_run_kwargs(cfg, tmp_path, 5))
    made = json.loads(args.to_json_string())
    assert {k: made[k] for k in learning_settings.trl_kwargs(cfg)} == learning_settings.trl_kwargs(cfg)
    assert args.generation_batch_size == 128 and args.epsilon_high == 0.28


def test_learning_bench_refuses_without_trl(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # as if TRL were not installed
    assert learning_vs_trl.main(["--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[bench]"' in err[0]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_learning_saved_steps_and_elapsed(tmp_path):
    assert learning_vs_trl._saved_steps(10, 5) == [5, 10]
    assert learning_vs_trl._saved_steps(12, 5) == [5, 10, 12]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "eval/accuracy": 0.1}\n{"step": 1, "time/elapsed": 0.5}\n'
                       '{"step": 2, "time/elapsed": 1.25, "eval/accuracy": 0.2}\n{"step": 3, "time/el')
    assert learning_vs_trl._elapsed_by_step(metrics) == {1: 0.5, 2: 1.25}  # the line being written is skipped
    assert learning_vs_trl._elapsed_by_step(tmp_path / "none.jsonl") == {}


def test_learning_checks_name_a_start_that_differs(tmp_path):
    cfg = learning_settings.row_config(["algo.name=dapo", "run.steps=10"])
    (tmp_path / "gradus" / "run").mkdir(parents=True)
    (tmp_path / "gradus" / "run" / "summary.json").write_text(json.dumps(
        {"heldout_accuracy_before": 0.142, "heldout_accuracy_after": 0.2}))
    same = {"gradus": _curve((0, 0.0, 0.142), (10, 5.0, 0.2)), "trl": _curve((0, 0.0, 0.142), (10, 5.0, 0.15))}
    assert learning_vs_trl.seed_checks(same, tmp_path, cfg) == []
    other = {"gradus": same["gradus"], "trl": _curve((0, 0.0, 0.144), (10, 5.0, 0.15))}
    assert [p.split(":")[0] for p in learning_vs_trl.seed_checks(other, tmp_path, cfg)] == ["the start differs"]
    late = {"gradus": _curve((0, 0.0, 0.142), (10, 5.0, 0.21)), "trl": same["trl"]}
    assert learning_vs_trl.seed_checks(late, tmp_path, cfg) == [
        "gradus' heldout_accuracy_after 0.2 != gradus eval's 0.21"]


def test_learning_reuses_a_finished_library_only_when_measured_alike(tmp_path, capsys):
    run = {"row": "dapo", "seed": 0, "steps": 10, "eval_every": 5, "threads": 1, "device": "cpu", "heldout_n": 500,
           "warm_start": "/w"}
    lib_dir = tmp_path / "dapo" / "seed0" / "gradus"
    lib_dir.mkdir(parents=True)
    curve = _curve((0, 0.0, 0.1), (10, 4.0, 0.2))
    (lib_dir / "spec.json").write_text(json.dumps(run))
    (lib_dir / "curve.json").write_text(json.dumps({"curve": curve, "run": run}))
    assert learning_vs_trl.run_library("gradus", lib_dir, [], 0, run, False, "[x]") == curve  # nothing is run
    with pytest.raises(SystemExit, match=r"steps \(kept 10, now 20\)"):
        learning_vs_trl.run_library("gradus", lib_dir, [], 0, {**run, "steps": 20}, False, "[x]")
