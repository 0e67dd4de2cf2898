"""`torchrun -m gradus train` on CPU (gloo), end to end: a 2-rank run (DDP or FSDP2) takes the steps a
1-process run takes on the same global batch, a killed 2-rank run resumes exactly, and a rank killed
mid-step ends the whole job at once, named. Each launch is a real torchrun of the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import write_digits_reward
from safetensors.torch import load_file

import gradus

from .conftest import tiny_overrides

STEPS = 3


def _env(reward_dir: Path, **extra: str) -> dict[str, str]:
    src = str(Path(gradus.__file__).parents[1])
    path = os.pathsep.join([src, str(reward_dir), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _launch(nproc: int | None, args: list[str], reward_dir: Path, **popen) -> subprocess.Popen:
    """`torchrun --nproc-per-node N -m gradus train ARGS` (nproc None: `python -m gradus train ARGS`)."""
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
              if nproc else [sys.executable])
    env = popen.pop("env", None) or _env(reward_dir)
    return subprocess.Popen([*runner, "-m", "gradus", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def _run(nproc: int | None, args: list[str], reward_dir: Path, timeout: float = 240) -> str:
    proc = _launch(nproc, args, reward_dir)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _policy(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "policy" / "model.safetensors")


def _args(nano_dir: Path, out: Path, name: str, **extra) -> list[str]:
    return [*tiny_overrides(nano_dir, out, **{"run.steps": STEPS, "run.save_every": 1, "run.name": name,
                                              "rollout.max_new_tokens": 8,
                                              "task.rewards": "my_rewards:digits:0.5,numeric_match", **extra})]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards")
    write_digits_reward(path, "my_rewards")
    return path


@pytest.fixture(scope="module")
def single_runs(nano_dir, reward_dir, tmp_path_factory):
    """One process on the whole global batch, per algorithm (computed once, compared by several tests)."""
    out = tmp_path_factory.mktemp("single")
    cache: dict[str, Path] = {}

    def get(algo: str) -> Path:
        if algo not in cache:
            _run(None, _args(nano_dir, out, algo, **{"algo.name": algo}), reward_dir)
            cache[algo] = out / algo
        return cache[algo]

    return get


def _assert_same_policy(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor]):
    assert set(got) == set(want)
    moved = max(float((want[k] - start[k]).norm() / start[k].norm().clamp(min=1e-12)) for k in want)
    assert moved > 1e-4, "the runs must really train for their agreement to mean something"
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(want)])  # noqa: E731
    err = float((flat(got) - flat(want)).norm() / flat(want).norm())
    assert err < 1e-5, err  # fp32: the whole policy, relative 1e-5
    for k in want:
        # per tensor too, except the key biases: their gradient is exactly 0 in exact arithmetic (a bias on
        # every key adds the same q.b to each score of a softmax row), so it is pure rounding noise, which
        # Adam's first steps scale up to lr-sized moves in either direction
        if not k.endswith("k_proj.bias"):
            err = float((got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-12))
            assert err < 1e-5, (k, err)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_train_as_one_process_on_the_same_global_batch(algo, parallel, nano_dir, reward_dir,
                                                                  single_runs, tmp_path):
    name = f"{algo}-{parallel}"
    out = _run(2, _args(nano_dir, tmp_path, name, **{"algo.name": algo, "run.parallel": parallel}), reward_dir)
    run = tmp_path / name
    assert "| " + algo in out  # rank 0 printed the summary table, once
    assert out.count("run folder:") == 1
    single = single_runs(algo)
    # batch-invariant sampling: the two ranks drew exactly the completions the single process drew
    lines = (run / "metrics.jsonl").read_text().splitlines()
    single_lines = (single / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(lines[1:-1], single_lines[1:-1], strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["rollout/length_mean"] == b["rollout/length_mean"] and a["rollout/tokens"] == b["rollout/tokens"]
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-6)
    _assert_same_policy(_policy(run), _policy(single), load_file(nano_dir / "model.safetensors"))
    # the policy is a plain HF checkpoint: transformers alone loads it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / f"step-{STEPS:06d}" / "policy")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    if algo == "ppo":
        assert (run / "checkpoints" / f"step-{STEPS:06d}" / "critic" / "config.json").is_file()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(every)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_a_killed_two_rank_run_resumes_exactly(parallel, nano_dir, reward_dir, tmp_path):
    # 8 steps, every one saved and kept: the kill lands after the first checkpoint and before the end
    # however slow or loaded the machine (the run is polled every 20 ms)
    long = {"run.parallel": parallel, "run.steps": 8, "run.keep_checkpoints": 10}
    _run(2, _args(nano_dir, tmp_path, "straight", **long), reward_dir)
    proc = _launch(2, _args(nano_dir, tmp_path, "killed", **long), reward_dir)
    saved = tmp_path / "killed" / "checkpoints"
    _wait_for(lambda: any(saved.glob("step-*/COMPLETE")), proc, 240, every=0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, at once, wherever they are
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert not (saved / "step-000008").exists(), "killed too late to test a resume"
    _run(2, ["--resume", str(tmp_path / "killed")], reward_dir)
    got, want = _policy(tmp_path / "killed", 8), _policy(tmp_path / "straight", 8)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _pids_with(marker: str, rank: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"GRADUS_TEST_MARK={marker}".encode() in env and f"RANK={rank}".encode() in env:
                found.append(int(entry.name))
    # the rank itself, not its reward workers (children that inherit its environment)
    return [pid for pid in found if _parent(pid) not in found]


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _two_ranks_training(nano_dir, reward_dir, tmp_path, name, timeout_s) -> tuple[subprocess.Popen, str, int]:
    """A long 2-rank run, once it has taken 2 steps: (torchrun, the marker in its ranks' environment, rank 1's pid)."""
    marker = uuid.uuid4().hex
    args = _args(nano_dir, tmp_path, name, **{"run.steps": 500, "run.save_every": 0, "run.dist_timeout_s": timeout_s})
    proc = _launch(2, args, reward_dir, env=_env(reward_dir, GRADUS_TEST_MARK=marker))
    metrics = tmp_path / name / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, proc, 240)
    victims = _pids_with(marker, "1")
    assert len(victims) == 1, victims
    return proc, marker, victims[0]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_mid_step_ends_the_job_at_once_and_is_named(nano_dir, reward_dir, tmp_path):
    proc, marker, victim = _two_ranks_training(nano_dir, reward_dir, tmp_path, "dies", 60)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = proc.communicate(timeout=90)
    took = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert took < 45, f"the job took {took:.0f} s to end after a rank died"
    assert "rank      : 1" in out and "SIGKILL" in out, out[-3000:]  # torchrun's report names the rank
    assert not _pids_with(marker, "0"), "rank 0 outlived the job"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_stuck_rank_ends_the_job_after_the_collective_timeout(nano_dir, reward_dir, tmp_path):
    # A rank that stops answering (SIGSTOP: alive, holding its sockets) is not a death torchrun can see; the
    # others give up after run.dist_timeout_s, say so, and torchrun then ends the stuck one (30 s later).
    proc, marker, victim = _two_ranks_training(nano_dir, reward_dir, tmp_path, "stuck", 5)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        for pid in _pids_with(marker, "1"):
            os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - stopped_at
    assert proc.returncode != 0
    assert took < 5 + 30 + 20, f"the job took {took:.0f} s to end after a rank got stuck"
    assert "gradus: data-parallel job stopped: rank 0 of 2: a collective failed" in out, out[-3000:]
    assert "run.dist_timeout_s=5" in out


def test_sigterm_to_torchrun_finishes_the_step_saves_and_says_so_once(nano_dir, reward_dir, tmp_path):
    args = _args(nano_dir, tmp_path, "term", **{"run.steps": 500, "run.save_every": 0, "run.parallel": "fsdp2"})
    proc = _launch(2, args, reward_dir)
    metrics = tmp_path / "term" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, proc, 240)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    out, _ = proc.communicate(timeout=60)
    saved = sorted((tmp_path / "term" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file() and (saved[0] / "dcp").is_dir(), out[-3000:]
    assert out.count("gradus: SIGTERM: finishing the current step") == 1, out[-3000:]  # rank 0 speaks
    assert out.count("gradus: stopped by SIGTERM after step") == 1, out[-3000:]
    assert f"--standalone -m gradus train --resume {tmp_path / 'term'}" in out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_lora_under_torchrun_trains_the_adapters_as_one_process(parallel, nano_dir, reward_dir, tmp_path):
    lora = {"model.lora_r": 4, "optim.lr": 0.01}
    _run(None, _args(nano_dir, tmp_path, "single", **lora), reward_dir)
    _run(2, _args(nano_dir, tmp_path, parallel, **lora, **{"run.parallel": parallel}), reward_dir)
    final = f"step-{STEPS:06d}"
    adapters = [load_file(tmp_path / name / "checkpoints" / final / "policy" / "adapter_model.safetensors")
                for name in (parallel, "single")]
    start = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in adapters[1].items()}  # B starts at 0
    _assert_same_policy(*adapters, start)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (the README's test command installs it)")
def test_vllm_under_torchrun_samples_each_ranks_share_as_one_process(micro_dir, reward_dir, tmp_path):
    """Each rank builds its own vLLM engine (an outer data-parallel group of vLLM) and samples its share of the
    global batch: the completions are those one process draws with vLLM, and the policies end the same."""
    engine = {"rollout.engine": "vllm", "vllm.kv_cache_gb": 0.05}
    _run(None, _args(micro_dir, tmp_path, "one", **engine), reward_dir)
    out = _run(2, _args(micro_dir, tmp_path, "two", **engine), reward_dir)
    assert out.count("run folder:") == 1
    records = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()[1:-1]]
               for name in ("two", "one")]
    for a, b in zip(*records, strict=True):
        assert a["rollout/tokens"] == b["rollout/tokens"] and a["rollout/length_mean"] == b["rollout/length_mean"]
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-6)
        assert a["mismatch/kl_k3"] < 1e-8  # each rank's engine got the weights of every update
    # the whole policy, relative 1e-5 (what the DDP equivalence asks); per tensor, the micro model's attention
    # biases get gradients near Adam's eps in these steps, where a rounding apart becomes an lr-sized move, so
    # only the sampling above (exactly equal) and the whole policy are compared
    got, want = _policy(tmp_path / "two"), _policy(tmp_path / "one")
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(want)])  # noqa: E731
    assert set(got) == set(want) and float((flat(got) - flat(want)).norm() / flat(want).norm()) < 1e-5


def test_a_two_rank_fsdp2_checkpoint_resumes_in_one_process(nano_dir, reward_dir, single_runs, tmp_path):
    """A checkpoint resumes under another world size and layout: a 2-rank FSDP2 job killed after a checkpoint,
    resumed by one process, ends where one process that was never interrupted ends."""
    long = {"run.parallel": "fsdp2", "run.steps": STEPS, "run.keep_checkpoints": 10}
    proc = _launch(2, _args(nano_dir, tmp_path, "killed", **long), reward_dir)
    saved = tmp_path / "killed" / "checkpoints"
    _wait_for(lambda: any(saved.glob("step-*/COMPLETE")), proc, 240, every=0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if (saved / f"step-{STEPS:06d}").exists():
        shutil.rmtree(saved / f"step-{STEPS:06d}")  # killed too late: resume from the one before
    _run(None, ["--resume", str(tmp_path / "killed"), "run.parallel=ddp"], reward_dir)  # one process: no wrapper
    _assert_same_policy(_policy(tmp_path / "killed"), _policy(single_runs("grpo")),
                        load_file(nano_dir / "model.safetensors"))


def test_a_config_that_cannot_work_fails_on_every_rank_before_any_work(nano_dir, reward_dir, tmp_path):
    # 3 prompts cannot be split over 2 ranks; and an out-of-range value is refused by every rank's check
    for bad, says in (({"rollout.prompts_per_step": 3}, "must be a multiple of the 2 processes"),
                      ({"optim.lr": -1}, "optim.lr")):
        proc = _launch(2, _args(nano_dir, tmp_path, "bad", **bad), reward_dir)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert out.count("gradus: config error:") == 2 and says in out, out[-3000:]  # both ranks refused it
        assert not (tmp_path / "bad").exists()  # before any work: not even the run folder


def test_the_data_position_on_resume_continues_without_repeating_an_example():
    from gradus.train.resume import data_position

    # rank r at position p has used global examples r, r + W, ..., (p - 1) * W + r
    assert [data_position([2, 2], r, 2) for r in (0, 1)] == [2, 2]  # same world: its own
    assert data_position([2, 2], 0, 1) == 4  # 2 ranks used 0-3: one process takes 4
    assert [data_position([4], r, 2) for r in (0, 1)] == [2, 2]  # 0-3 used: ranks take 4, 5
    # DAPO: rank 0 drew 3 rounds (0, 2, 4), rank 1 one (1): one process continues at 5, never at 3 or 4
    assert data_position([3, 1], 0, 1) == 5
    assert data_position([3, 1], 1, 3) == 2  # 3 ranks: index 2 * 3 + 1 = 7 >= 5
    assert data_position([0], 0, 2) == 0


def test_episodes_under_ddp_train_as_one_process(nano_dir, reward_dir, tmp_path):
    """Multi-turn episodes (a user environment from a file) on two ranks: each rank plays its share of the
    episodes, keyed per turn, so they are the single process's, and the policies end the same."""
    envs = Path(__file__).parents[1] / "envs" / "sample_envs.py"
    episodes = {"env.name": f"{envs}:DigitsVaried", "env.max_turns": 3, "env.max_tokens": 24, "run.steps": STEPS,
                "run.save_every": 1, "rollout.max_new_tokens": 6}
    _run(None, tiny_overrides(nano_dir, tmp_path, **episodes, **{"run.name": "one"}), reward_dir)
    _run(2, tiny_overrides(nano_dir, tmp_path, **episodes, **{"run.name": "two", "run.parallel": "ddp"}),
         reward_dir)
    records = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()[1:-1]]
               for name in ("two", "one")]
    for a, b in zip(*records, strict=True):
        assert a["rollout/tokens"] == b["rollout/tokens"] and a["env/env_tokens"] == b["env/env_tokens"]
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-6)
    # the held-out episodes are split over the ranks; success and turns per episode are totals over both
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    for key in ("heldout_accuracy_after", "heldout_turns_before", "heldout_turns_after"):
        assert two[key] == one[key], key
    _assert_same_policy(_policy(tmp_path / "two"), _policy(tmp_path / "one"),
                        load_file(nano_dir / "model.safetensors"))
