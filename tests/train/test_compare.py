"""`gradus compare` plumbing on a nano model: two algorithms, two seeds, a few steps."""

import gzip
import json

import pytest

from gradus.cli import main
from gradus.compare import ComparePlan, run_compare, write_report
from gradus.compare.data import RunData, load_runs
from gradus.compare.plots import _colors, smooth, stack_by_step
from gradus.compare.report import run_row
from gradus.config import ConfigError
from gradus.train.trainer import Trainer

from .conftest import dies_at, tiny_overrides


def _plan(nano_dir, tmp_path, signal_reward, **extra):
    overrides = tiny_overrides(nano_dir, tmp_path, **{"task.rewards": signal_reward, "run.steps": 3,
                                                      "run.eval_every": 2, "optim.minibatches": 4, **extra})
    # compare sets these per run; the fixture's would clash
    overrides = [o for o in overrides if not o.startswith(("run.out_dir", "run.seed", "algo.name"))]
    return ComparePlan(algos=["grpo", "sapo"], seeds=2, overrides=overrides)


def test_compare_trains_every_run_and_writes_the_report(nano_dir, tmp_path, signal_reward):
    out = tmp_path / "cmp"
    statuses = run_compare(_plan(nano_dir, tmp_path, signal_reward), out, echo=lambda m: None)
    assert [(s.name, s.state) for s in statuses] == [
        ("grpo-seed0", "done"), ("sapo-seed0", "done"), ("grpo-seed1", "done"), ("sapo-seed1", "done")]
    report = (out / "report.md").read_text()
    assert "| grpo | 2/2 |" in report and "| sapo | 2/2 |" in report
    for png in ("accuracy", "reward", "clip_fractions", "entropy", "entropy_reward", "length", "kl_gate"):
        assert (out / f"{png}.png").stat().st_size > 5000, png
        assert f"({png}.png)" in report
    # a report kept with gzipped metrics (as docs/ keeps them) redraws to the same report
    for path in (out / "metrics").glob("*.jsonl"):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    write_report(out)
    assert (out / "report.md").read_text() == report
    # raw metrics are next to the report; same seed, same prompts: the first step's batch is identical
    plan, runs = load_runs(out)
    by_name = {r.name: r for r in runs}
    def first_batch(name):  # what the first step sampled (rewards alone can tie: 1 correct of 64 in both)
        return tuple(by_name[name].records[1][k] for k in ("reward/mean", "rollout/length_mean"))

    assert first_batch("grpo-seed0") == first_batch("sapo-seed0")
    assert first_batch("grpo-seed0") != first_batch("grpo-seed1")
    # several minibatches (given here: off-policy, so SAPO's gate drops below 1); the compare defaults apply (KL
    # monitored, one checkpoint kept), and nothing else differs from `gradus train`'s config
    sapo = by_name["sapo-seed0"]
    assert all(v <= 1.0 for _, v in sapo.series("actor/gate_weight_mean"))
    assert min(v for _, v in sapo.series("actor/gate_weight_mean")) < 1.0
    assert sapo.series("actor/kl_ref")
    assert (out / "runs" / "sapo-seed0" / "config.yaml").read_text().count("minibatches: 4") == 1
    assert len(list((out / "runs" / "sapo-seed0" / "checkpoints").glob("step-*"))) == 1


def test_compare_runs_have_gradus_train_defaults(tmp_path):
    """A comparison measures what `gradus train` does: its runs differ from `gradus train --algo A` only in the
    KL being monitored and the checkpoints kept."""
    from gradus.config import load_config

    plan = ComparePlan(algos=["dapo"], seeds=1)
    got = plan.config(tmp_path, "dapo", 0, "dapo-seed0")
    want = load_config(overrides=["algo.name=dapo", f"run.out_dir={tmp_path / 'runs'}", "run.name=dapo-seed0",
                                  "algo.monitor_kl=true", "run.keep_checkpoints=1"])
    assert got == want


def test_a_failing_run_is_reported_and_the_others_go_on_then_resume_finishes(
        nano_dir, tmp_path, signal_reward, monkeypatch):
    out = tmp_path / "cmp"
    plan = _plan(nano_dir, tmp_path, signal_reward)
    plan.seeds = 1
    real_step = Trainer.train_step

    def sapo_breaks(self, step):
        if self.algo.name == "sapo":
            raise RuntimeError("boom")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", sapo_breaks)
    statuses = run_compare(plan, out, echo=lambda m: None)
    assert [s.state for s in statuses] == ["done", "failed"]
    report = (out / "report.md").read_text()
    assert "| sapo | 0/1 |" in report and "sapo-seed0: RuntimeError: boom" in report

    monkeypatch.setattr(Trainer, "train_step", real_step)
    with pytest.raises(ConfigError, match="--resume"):
        run_compare(plan, out, echo=lambda m: None)  # the folder is taken: say how to continue it
    assert main(["compare", "--resume", str(out), "--no-progress"]) == 0
    _, runs = load_runs(out)
    assert all(r.summary for r in runs)
    assert json.loads((out / "metrics" / "grpo-seed0.summary.json").read_text())["steps"] == 3


def test_an_interrupted_run_resumes_from_its_checkpoint(nano_dir, tmp_path, signal_reward, monkeypatch):
    out = tmp_path / "cmp"
    plan = _plan(nano_dir, tmp_path, signal_reward, **{"run.save_every": 2, "run.steps": 4})
    plan.algos, plan.seeds = ["grpo"], 1
    with dies_at(monkeypatch, 3, KeyboardInterrupt()):
        run_compare(plan, out, echo=lambda m: None)
    messages = []
    run_compare(plan, out, resume=True, echo=messages.append)
    assert "resuming" in messages[0]
    steps = [r["step"] for r in load_runs(out)[1][0].records if "reward/mean" in r]
    assert steps == [1, 2, 3, 4]


def test_bad_plans_fail_before_any_work(nano_dir, tmp_path, signal_reward):
    plan = _plan(nano_dir, tmp_path, signal_reward)
    plan.algos = ["grpo", "grpoo"]
    with pytest.raises(ConfigError, match="algo.name"):
        run_compare(plan, tmp_path / "a", echo=lambda m: None)
    plan.algos = ["grpo"]
    plan.overrides = [*plan.overrides, "run.seed=3"]
    with pytest.raises(ConfigError, match="run.seed"):
        run_compare(plan, tmp_path / "b", echo=lambda m: None)
    assert not (tmp_path / "a" / "runs").exists()


def test_report_row_numbers_from_hand_made_records():
    records = [{"step": 0, "eval/accuracy": 0.2}]
    for step in range(1, 11):
        records.append({"step": step, "reward/mean": step / 10, "rollout/tokens": 100, "rollout/length_mean": 5.0,
                        "actor/clip_frac_high": 0.1 * (step % 2), "actor/entropy": float(step),
                        "time/elapsed": 2.0 * step, **({"eval/accuracy": 0.25 + 0.01 * step} if step % 5 == 0 else {})})
    run = RunData("grpo-seed0", "grpo", 0, records, {"heldout_accuracy_before": 0.2, "heldout_accuracy_after": 0.35,
                                                      "wall_time_s": 20.0})
    row = run_row(run, target=0.33)
    # evals: step 5 -> 0.30, step 10 -> 0.35 >= 0.33, reached at step 10 after 20 s of training
    assert row["steps_to_target"] == 10 and row["time_to_target"] == 20.0
    assert row["tokens"] == 1000 and row["length"] == 5.0
    assert row["gain"] == pytest.approx(15.0)  # 0.20 -> 0.35
    assert row["clip_high"] == pytest.approx(0.05)  # half the steps at 0.1
    assert row["clip_low"] is None and row["gate"] is None and row["dropped"] is None
    assert row["entropy"] == 10.0  # the last tenth of 10 steps is step 10
    assert run_row(run, target=0.5)["steps_to_target"] is None
    # default: 10 points over this run's own start (0.2 -> 0.30, reached exactly at step 5, after 10 s)
    assert run_row(run, target=None)["steps_to_target"] == 5 and run_row(run, target=None)["time_to_target"] == 10.0


def test_smoothing_and_stacking():
    # trailing mean over 3: [1, (1+2)/2, (1+2+3)/3, (2+3+4)/3]
    assert smooth([1.0, 2.0, 3.0, 4.0], window=3).tolist() == [1.0, 1.5, 2.0, 3.0]
    a = RunData("a", "grpo", 0, [{"step": s, "x": float(s)} for s in (1, 2, 3)], {})
    b = RunData("b", "grpo", 1, [{"step": s, "x": 2.0 * s} for s in (2, 3)], {})
    steps, values = stack_by_step([a, b], "x", window=1)
    assert steps.tolist() == [2, 3] and values.tolist() == [[2.0, 3.0], [4.0, 6.0]]


@pytest.mark.parametrize("n", [1, 5, 10, 12, 20, 25])
def test_every_algorithm_gets_a_color_of_its_own(n):
    colors = _colors([f"algo{i}" for i in range(n)])
    assert len(colors) == n and len(set(colors.values())) == n


def test_an_algos_entry_can_be_a_variant_with_its_own_settings(tmp_path):
    from gradus.compare.jobs import run_name
    from gradus.compare.runner import ComparePlan

    plan = ComparePlan(algos=["grpo", "grpo:algo.kl_coef=0:optim.lr=1e-4"], seeds=1, overrides=["run.steps=3"])
    names = [name for _, _, name in plan.run_names()]
    assert names == ["grpo-seed0", "grpo+kl_coef=0+lr=1e-4-seed0"]
    base, variant = (plan.config(tmp_path, algo, 0, name) for algo, _, name in plan.run_names())
    assert base.algo.kl_coef is None and base.optim.lr == 2e-4
    assert variant.algo.name == "grpo" and variant.algo.kl_coef == 0 and variant.optim.lr == 1e-4
    assert variant.run.steps == 3 and run_name("gspo", 2) == "gspo-seed2"
    with pytest.raises(ConfigError, match="key=value"):
        plan.config(tmp_path, "grpo:r3", 0, "x")
    with pytest.raises(ConfigError, match="set by gradus compare"):
        plan.config(tmp_path, "grpo:run.seed=3", 0, "x")


def test_a_resumed_comparison_runs_the_config_it_started_with(nano_dir, tmp_path, signal_reward, monkeypatch):
    from gradus.compare import runner

    out = tmp_path / "cmp"
    plan = _plan(nano_dir, tmp_path, signal_reward)
    plan.algos, plan.seeds = ["grpo"], 1
    plan.freeze()
    runner.save_plan(plan, out)
    started = plan.config(out, "grpo", 0, "grpo-seed0")
    assert started.algo.monitor_kl is True and started.run.steps == 3
    # gradus' defaults change between the start and the resume (here: compare's own)
    monkeypatch.setitem(runner.COMPARE_DEFAULTS, "optim.lr", "1e-3")
    assert runner.load_plan(out).config(out, "grpo", 0, "grpo-seed0") == started
    # a compare.json from before the base was kept: rebuilt from today's defaults, and the resume says so
    saved = json.loads((out / "compare.json").read_text())
    del saved["base"]
    (out / "compare.json").write_text(json.dumps(saved))
    old = runner.load_plan(out)
    assert old.config(out, "grpo", 0, "grpo-seed0").optim.lr == 1e-3
    messages = []
    run_compare(old, out, resume=True, echo=messages.append)
    assert "saved by an older gradus" in messages[0] and "today's defaults" in messages[0]
    assert json.loads((out / "metrics" / "grpo-seed0.summary.json").read_text())["steps"] == 3


def test_jobs_2_trains_the_same_runs_as_one_at_a_time(nano_dir, tmp_path, signal_reward):
    """--jobs 2: each run in a worker process, two at once; every run logs exactly what it logs when the runs go
    one at a time in this process (all but the timings), and the report has every run."""
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run_compare(_plan(nano_dir, tmp_path, signal_reward), serial, echo=lambda m: None)
    messages = []
    statuses = run_compare(_plan(nano_dir, tmp_path, signal_reward), parallel, echo=messages.append, jobs=2)
    assert [(s.name, s.state) for s in statuses] == [
        ("grpo-seed0", "done"), ("sapo-seed0", "done"), ("grpo-seed1", "done"), ("sapo-seed1", "done")]
    assert sum("done in" in m for m in messages) == 4 and messages[-1].startswith("report:")

    def logged(out, name):  # everything but the clock
        return [{k: v for k, v in r.items() if not (k.startswith("time/") or k.endswith(("_seconds", "per_s")))}
                for r in by_name(out)[name].records]

    def by_name(out):
        return {r.name: r for r in load_runs(out)[1]}

    for name in ("grpo-seed0", "sapo-seed0", "grpo-seed1", "sapo-seed1"):
        assert len(logged(parallel, name)) > 3 and logged(parallel, name) == logged(serial, name), name
    assert "| grpo | 2/2 |" in (parallel / "report.md").read_text()


def test_a_worker_killed_from_outside_is_a_failed_run_that_says_so(tmp_path):
    from gradus.compare.jobs import RunJob
    from gradus.compare.parallel import _ended, _last_step, progress_line

    (tmp_path / "metrics").mkdir()
    job = RunJob("grpo-seed0", "grpo", 0, "[1/2] grpo-seed0", None, tmp_path / "runs" / "grpo-seed0", False)
    messages = []
    status = _ended(job, -9, 12.0, tmp_path, messages.append)
    assert status.state == "failed" and "SIGKILL" in status.error and "SIGKILL" in messages[0]
    assert "--resume" in (tmp_path / "metrics" / "grpo-seed0.error.txt").read_text()
    assert _ended(job, 130, 1.0, tmp_path, messages.append).state == "interrupted"
    # the progress line's step: the newest in metrics.jsonl, 0 before there is one
    assert _last_step(job.run_dir) == 0
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.1}\n{"step": 17, "reward/mean": 0.5}\n')
    assert _last_step(job.run_dir) == 17
    # run.steps unset: the algorithm's own steps (1500 for grpo, 1000 for dapo)
    plan = ComparePlan(algos=["grpo", "dapo"], seeds=1)
    job.cfg = plan.config(tmp_path, "grpo", 0, "grpo-seed0")
    other = RunJob("dapo-seed0", "dapo", 0, "[2/2] dapo-seed0", plan.config(tmp_path, "dapo", 0, "dapo-seed0"),
                   tmp_path / "runs" / "dapo-seed0", False)
    assert progress_line([job, other]) == "in progress: grpo-seed0 step 17/1500, dapo-seed0 step 0/1000"


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--jobs"):
        run_compare(ComparePlan(algos=["grpo"], seeds=1), tmp_path / "c", echo=lambda m: None, jobs=0)
