"""Ctrl-C, SIGTERM and kills at any point of a run, a full disk, and --resume's flags .

Each case checks what a user relies on afterwards: the run resumes, and ends with exactly the
parameters of a run that was never interrupted (torch.equal), its metrics logged once. The tests use
only names the code had before these faults were fixed, so each was seen to fail on that code.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_digits_reward
from torch.optim.optimizer import register_optimizer_step_post_hook
from train.conftest import tiny_overrides

import gradus
from gradus.cli import main
from gradus.config import load_config
from gradus.models import build_char_tokenizer, build_tiny_model, load_pretrained
from gradus.rollout import LocalEngine
from gradus.runtime import hf_writer
from gradus.train.checkpoint import latest_checkpoint, load_state, save_checkpoint
from gradus.train.resume import resume_config
from gradus.train.runlog import RunLogger, read_metrics, truncate_metrics
from gradus.train.scoring import Scorer
from gradus.train.trainer import Trainer

STEPS = 2
REWARD = "fault_rewards:digits:0.5,numeric_match"  # an untrained model scores 0 on the task alone


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A user reward that pays for digits, so groups differ and every step moves the parameters."""
    home = tmp_path_factory.mktemp("fault_rewards")
    write_digits_reward(home, "fault_rewards")
    sys.path.insert(0, str(home))
    yield home
    sys.path.remove(str(home))


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The end-of-run plot is a second of matplotlib per run and has nothing to do with these faults."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gradus.train.plots.plot_run", lambda *args, **kwargs: None)
        yield


def overrides(nano, out, **extra):
    base = {"run.steps": STEPS, "optim.minibatches": 2, "task.rewards": REWARD, "run.save_every": 0,
            "optim.schedule": "constant", "run.name": "run", "task.heldout_size": 4, "rollout.prompts_per_step": 2}
    return tiny_overrides(nano, out, **{**base, **extra})


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def straight(nano_dir, reward_dir, tmp_path_factory):
    """Parameters after an uninterrupted run."""
    trainer = Trainer(load_config(overrides=overrides(nano_dir, tmp_path_factory.mktemp("straight"))))
    trainer.fit()
    final, initial = params(trainer.policy), params(load_pretrained(nano_dir)[0])
    assert any(not torch.equal(a, b) for a, b in zip(initial, final, strict=True))  # the test can fail
    return final


def resume(run_dir, extra=()):
    trainer = Trainer(resume_config(run_dir, list(extra)), run_dir=run_dir, resume=True)
    trainer.fit()
    return trainer


def assert_logged_once(run_dir, steps=STEPS):
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "reward/mean" in r] == list(range(1, steps + 1))
    evals = [r["step"] for r in records if all(k == "step" or k.startswith("eval/") for k in r)]
    assert evals == [0, steps]  # before training, and the final evaluation: once each


def complete_looking(ckpt):
    """A folder marked complete must hold what a resume loads."""
    return (ckpt / "state.pt").is_file() and any((ckpt / "policy").glob("*.safetensors"))


# ---- a first Ctrl-C inside a step: the step finishes, is saved, and the resume is exact -------------------
# Where the signal lands: a hook that calls fire() at every call of one part of the step. The call at
# which the signal is sent is drawn at random (fixed seed per hook), and printed to replay a failure.
def _hook_generate(mp, fire):  # call 1 is the evaluation before step 1; the next ones sample steps 1, 2, ...
    real = LocalEngine.generate
    mp.setattr(LocalEngine, "generate", lambda self, *a, **k: (fire(), real(self, *a, **k))[1])


def _hook_score(mp, fire):
    real = Scorer.score
    mp.setattr(Scorer, "score", lambda self, *a, **k: (fire(), real(self, *a, **k))[1])


def _hook_optimizer(mp, fire):  # two minibatches a step: odd calls fall between them, even ones after the last
    handle = register_optimizer_step_post_hook(lambda *a: fire())
    return handle.remove


def _hook_before_increment(mp, fire):  # the update is done, the step counter not yet moved on
    real = Trainer.train_step
    mp.setattr(Trainer, "train_step", lambda self, step: (real(self, step), fire())[0])


HOOKS = {"generate": (_hook_generate, STEPS + 1), "score": (_hook_score, STEPS),
         "optimizer": (_hook_optimizer, 2 * STEPS), "before_increment": (_hook_before_increment, STEPS)}


# (hook, call): None draws the call; generate's first call is fixed once to cover a stop before step 1
CASES = [(where, None) for where in HOOKS] + [("generate", 1)]


@pytest.mark.parametrize(("where", "call"), CASES, ids=[f"{w}-{c or 'random'}" for w, c in CASES])
def test_ctrl_c_inside_a_step_then_resume_is_exact(where, call, nano_dir, reward_dir, straight,
                                                   tmp_path, monkeypatch):
    hook, calls_in_run = HOOKS[where]
    target = call or random.Random(f"issue10-{where}").randint(1, calls_in_run)
    print(f"SIGINT at call {target} of the {where} hook")
    calls = 0

    def fire():
        nonlocal calls
        calls += 1
        if calls == target:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, delivered to this process

    trainer = Trainer(load_config(overrides=overrides(nano_dir, tmp_path)))
    before = signal.getsignal(signal.SIGINT)
    undo = hook(monkeypatch, fire)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        if undo:
            undo()
        monkeypatch.undo()
    assert calls >= target and signal.getsignal(signal.SIGINT) is before  # the handlers are restored
    saved = latest_checkpoint(trainer.run_dir)
    assert saved is not None and load_state(saved)["step"] == trainer.step
    assert_same(params(resume(trainer.run_dir).policy), straight)
    assert_logged_once(trainer.run_dir)


def test_second_ctrl_c_aborts_at_once_and_saves_nothing(nano_dir, reward_dir, straight, tmp_path,
                                                         monkeypatch):
    trainer = Trainer(load_config(overrides=overrides(nano_dir, tmp_path, **{"run.save_every": 1})))
    real = Scorer.score
    state = {"step": 0}

    def twice_in_step_2(self, *a, **k):
        if state["step"] == 1:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(self, *a, **k)

    real_step = Trainer.train_step

    def counting(self, step):
        state["step"] = step - 1
        return real_step(self, step)

    monkeypatch.setattr(Scorer, "score", twice_in_step_2)
    monkeypatch.setattr(Trainer, "train_step", counting)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    assert latest_checkpoint(trainer.run_dir).name == "step-000001"  # the good one, not half of step 2
    assert load_state(latest_checkpoint(trainer.run_dir))["step"] == 1
    assert_same(params(resume(trainer.run_dir).policy), straight)
    assert_logged_once(trainer.run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_signal_to_a_cli_run_then_resume_with_steps(sig, nano_dir, reward_dir, straight, tmp_path):
    """A real `kill` to `gradus train`: it finishes its step, saves, exits 128+signal; `--resume RUN
    --steps N` then ends where an uninterrupted N-step run ends."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(gradus.__file__).parents[1]), str(reward_dir), os.environ.get("PYTHONPATH", "")]))
    args = overrides(nano_dir, tmp_path, **{"run.steps": 50, "run.threads": 1})
    proc = subprocess.Popen([sys.executable, "-m", "gradus.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and '"step": 1, ' in metrics.read_text()):  # step 1 is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert signal.Signals(sig).name in err and "--resume" in err
    done = load_state(latest_checkpoint(tmp_path / "run"))["step"]  # 1 if the signal beat step 2's start
    assert 1 <= done < 50
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--resume", str(tmp_path / "run"), "--steps", str(STEPS), "--no-progress",
                     "run.threads=1"]) == 0
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == max(done, STEPS)
        if done <= STEPS:  # the usual case: compare with the uninterrupted run
            final = load_pretrained(latest_checkpoint(tmp_path / "run") / "policy")[0]
            assert_same(params(final), straight)
            assert_logged_once(tmp_path / "run")
    finally:
        torch.set_num_threads(threads)


def _compare_jobs_2_under_way(nano_dir, reward_dir, tmp_path, steps):
    """`gradus compare --jobs 2` of grpo and sapo in a subprocess, once both runs have logged step 1; stderr goes
    to tmp_path/stderr. Returns the process, the compare folder and the two run folders."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(gradus.__file__).parents[1]), str(reward_dir), os.environ.get("PYTHONPATH", "")]))
    args = [o for o in overrides(nano_dir, tmp_path, **{"run.steps": steps, "run.threads": 1})
            if not o.startswith(("run.out_dir", "run.name", "algo.name"))]
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "gradus.cli", "compare", "--algos", "grpo,sapo", "--seeds", "1",
                             "--jobs", "2", "--out", str(out), "--no-progress", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"))
    runs = [out / "runs" / name for name in ("grpo-seed0", "sapo-seed0")]
    deadline = time.monotonic() + 120
    while not all((r / "metrics.jsonl").is_file() and '"step": 1, ' in (r / "metrics.jsonl").read_text()
                  for r in runs):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
        time.sleep(0.02)
    return proc, out, runs


def test_ctrl_c_to_compare_jobs_2_stops_both_runs_saved_then_resume_finishes(nano_dir, reward_dir, tmp_path):
    """`gradus compare --jobs 2` and a Ctrl-C: the parent passes it on once to each run (the workers are out of
    the terminal's process group), each finishes and saves its step, the command exits 130 saying how to
    continue; `--resume` then ends both runs with every step logged once."""
    proc, out, runs = _compare_jobs_2_under_way(nano_dir, reward_dir, tmp_path, steps=30)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 130, err
    assert "stopped on SIGINT" in err and f"gradus compare --resume {out}" in err
    for run in runs:
        assert 1 <= load_state(latest_checkpoint(run))["step"] < 30, err  # the step in progress was saved
    assert not list((out / "metrics").glob("*.summary.json"))
    assert main(["compare", "--resume", str(out), "--jobs", "2", "--no-progress"]) == 0
    for run in runs:
        assert_logged_once(run, steps=30)
        assert json.loads((out / "metrics" / f"{run.name}.summary.json").read_text())["steps"] == 30


def _workers_of(pid):
    """The `--jobs` worker processes of `pid` (spawned multiprocessing children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            pass
    return found


def _alive(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_to_compare_jobs_2_stops_its_runs_saved_then_resume_finishes(nano_dir, reward_dir, tmp_path):
    """`kill -9` to `gradus compare --jobs 2`: its runs are told (SIGTERM at the parent's death), save their step
    and stop, instead of training on unseen; `--resume` then ends both. (The kernel's PR_SET_PDEATHSIG, tried
    first, sent one signal per thread of the dead parent: the second made the runs abandon their step.)"""
    proc, out, runs = _compare_jobs_2_under_way(nano_dir, reward_dir, tmp_path, steps=60)
    workers = _workers_of(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "a run went on after its parent was killed\n" + (
            tmp_path / "stderr").read_text()
        time.sleep(0.05)
    for run in runs:
        assert not (run / "summary.json").exists()  # stopped, not trained to its end
        assert 1 <= load_state(latest_checkpoint(run))["step"] < 60
    assert main(["compare", "--resume", str(out), "--jobs", "2", "--no-progress"]) == 0
    for run in runs:
        assert_logged_once(run, steps=60)


# ---- kills while checkpointing ----------------------------------------------------------------------------
def test_resume_skips_a_checkpoint_marked_complete_without_policy(nano_dir, reward_dir, straight, tmp_path,
                                                                  capsys):
    trainer = Trainer(load_config(overrides=overrides(nano_dir, tmp_path, **{
        "run.save_every": 1})))
    trainer.fit()
    newest = latest_checkpoint(tmp_path / "run")
    assert newest.name == f"step-{STEPS:06d}"
    shutil.rmtree(newest / "policy")  # what a kill inside the old prune / re-save left behind
    resumed = resume(tmp_path / "run")
    assert newest.name in capsys.readouterr().err  # says which checkpoint it skipped
    assert resumed.eval_before is not None
    assert_same(params(resumed.policy), straight)
    assert_logged_once(tmp_path / "run")


def test_a_kill_while_deleting_a_checkpoint_never_leaves_a_broken_one(nano_dir, reward_dir, straight,
                                                                      tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):  # deletes policy/ first, then the process dies
        path = Path(path)
        if (path / "COMPLETE").is_file() and (path / "policy").is_dir():
            real_rmtree(path / "policy")
            raise SystemExit("killed")
        return real_rmtree(path, *a, **k)

    trainer = Trainer(load_config(overrides=overrides(nano_dir, tmp_path, **{
        "run.save_every": 1, "run.keep_checkpoints": 1})))
    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        trainer.fit()
    monkeypatch.undo()
    marked = [p for p in (tmp_path / "run" / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
    assert marked and all(complete_looking(p) for p in marked)
    assert_same(params(resume(tmp_path / "run").policy), straight)
    assert_logged_once(tmp_path / "run")


def test_files_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    tok = build_char_tokenizer()
    final = save_checkpoint(tmp_path, 1, writers={"policy": hf_writer(build_tiny_model("nano", tokenizer=tok), tok)},
                            state={"x": 1})
    monkeypatch.undo()
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final))
    tmp = events[publish][1]
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    for rel in ("state.pt", "policy/model.safetensors", "policy/config.json", "COMPLETE", "policy", ""):
        assert os.path.join(tmp, rel).rstrip("/") in synced, rel
    assert ("fsync", str(final.parent)) in events[publish:]  # the rename itself made durable


# ---- metrics after a resume -------------------------------------------------------------------------------
def test_kill_after_the_final_evaluation_logs_it_once(nano_dir, reward_dir, tmp_path, monkeypatch):
    trainer = Trainer(load_config(overrides=overrides(nano_dir, tmp_path, **{"run.steps": 1, "run.save_every": 1})))
    monkeypatch.setattr(Trainer, "write_summary", lambda self, final: sys.exit("killed"))
    with pytest.raises(SystemExit):
        trainer.fit()
    monkeypatch.undo()
    # resumed off the main thread, where no signal handler can be installed
    done = []
    thread = threading.Thread(target=lambda: done.append(resume(tmp_path / "run")))
    thread.start()
    thread.join()
    assert done, "the resume in a thread failed"
    assert_logged_once(tmp_path / "run", steps=1)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval/accuracy": 0.0}, {"step": 1, "reward/mean": 0.5}, {"step": 1, "eval/accuracy": 0.1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 2, "reward/me')
    truncate_metrics(path, 1)  # resumed at step 1: its final evaluation and the torn line go
    assert read_metrics(path) == lines[:2]


# ---- --resume and the shortcut flags ----------------------------------------------------------------------
def test_resume_takes_steps_and_refuses_flags_that_would_change_the_run(nano_dir, reward_dir, tmp_path,
                                                                        capsys, monkeypatch):
    args = overrides(nano_dir, tmp_path, **{"run.steps": 1, "run.save_every": 1})
    assert main(["train", *args]) == 0
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--resume", run, "--algo", "ppo", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "algo.name" in err and "cannot change" in err
    assert main(["train", "--resume", run, "--seed", "1"]) == 2
    # the disk fills up while step 2 is saved: the user is told so, and how to go on afterwards
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    assert main(["train", "--resume", run, "--steps", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "disk full" in err and f"--resume {run}" in err
    monkeypatch.undo()
    assert main(["train", "--resume", run, "--steps", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert_logged_once(tmp_path / "run", steps=2)


# ---- a full disk ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4058"),  # torch's words
])
def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(failure, tmp_path, monkeypatch):
    tok = build_char_tokenizer()
    model = build_tiny_model("nano", tokenizer=tok)
    save_checkpoint(tmp_path, 1, writers={"policy": hf_writer(model, tok)}, state={"x": 1})

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full)
    if isinstance(failure, RuntimeError):  # no errno to go by: the free space tells
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(Exception) as info:
        save_checkpoint(tmp_path, 2, writers={"policy": hf_writer(model, tok)}, state={"x": 2})
    monkeypatch.undo()
    assert "disk full" in str(info.value) and str(tmp_path / "checkpoints") in str(info.value)
    assert latest_checkpoint(tmp_path).name == "step-000001" and load_state(latest_checkpoint(tmp_path))["x"] == 1
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # its space is given back


def test_a_full_disk_while_logging_metrics_says_so(tmp_path):
    log = RunLogger(tmp_path, total_steps=1, progress=False)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = write

    real, log._file = log._file, Full()
    with pytest.raises(OSError, match="disk full"):
        log.log(1, {"reward/mean": 1.0})
    log._file = real
    log.close()
