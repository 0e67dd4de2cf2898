"""The thread governor: fewer threads when cores are busy elsewhere, and results that do not depend
on the thread count (so following the load changes speed, never the trained model)."""

import hashlib
import os
import subprocess
import sys
import time

import pytest
import torch

from gradus.config import SFTConfig, load_config
from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.tasks import get_task
from gradus.threads import MACHINE_THREADS, Sample, ThreadGovernor, governor_for, ours_between, read_sample, threads_for
from gradus.train.sft import run_sft


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_kernel(steps):
    """A sampler that replays (wall, ours, idle) deltas: each pick sees the next one."""
    state = {"wall": 0.0, "ours": 0.0, "idle": 0.0}
    queue = list(steps)

    def sample(helpers=()):
        if queue:
            wall, ours, idle = queue.pop(0)
            state["wall"] += wall
            state["ours"] += ours
            state["idle"] += idle
        return Sample(state["wall"], state["ours"], state["idle"])

    return sample


@pytest.mark.parametrize(("free", "max_threads", "expected"), [
    (2.0, 2, 2), (1.8, 2, 2), (1.74, 2, 1), (1.33, 2, 1), (0.4, 2, 1), (9.0, 8, 8), (5.8, 8, 6), (5.7, 8, 5)])
def test_threads_for_rounds_down_unless_close_to_a_whole_core(free, max_threads, expected):
    assert threads_for(free, max_threads) == expected


def test_governor_follows_the_cores_left_to_it(monkeypatch):
    monkeypatch.setattr("gradus.threads._FIRST_LOOK_S", 0.0)
    gov = ThreadGovernor(max_threads=2, sample=fake_kernel([
        (0.0, 0.0, 0.0),   # first pick: the counters now ...
        (0.05, 0.0, 0.1),  # ... and 50 ms later: both cores idle -> 2 threads
        (1.0, 2.0, 0.0),   # a unit where we used both cores -> 2
        (1.0, 1.33, 0.0),  # a busy process took a third of our time -> 1
        (1.0, 1.0, 0.0),   # one thread, the other core busy elsewhere -> 1
        (1.0, 1.0, 0.95),  # the busy process ended: a core sat idle -> 2
    ]))
    assert [gov.pick() for _ in range(5)] == [2, 2, 1, 1, 2]
    assert torch.get_num_threads() == 2


def test_first_look_at_a_busy_machine_starts_with_fewer_threads(monkeypatch):
    monkeypatch.setattr("gradus.threads._FIRST_LOOK_S", 0.0)
    gov = ThreadGovernor(max_threads=2, sample=fake_kernel([(0.0, 0.0, 0.0), (0.05, 0.0, 0.05)]))
    assert gov.pick() == 1 and torch.get_num_threads() == 1


def test_a_replaced_helper_takes_nothing_away():
    # helper 7 ran 5 s and was killed; its replacement 8 has run 0.5 s; this process ran 1 s
    before = Sample(0.0, 10.0, 0.0, {7: 5.0})
    after = Sample(1.0, 11.0, 0.0, {8: 0.5})
    assert ours_between(before, after) == pytest.approx(1.5)


def test_a_run_left_at_one_thread_does_not_cap_the_next(monkeypatch):
    """The most threads a governor uses is the machine's count at import, not what an earlier run left set."""
    monkeypatch.setattr("gradus.threads._FIRST_LOOK_S", 0.0)
    torch.set_num_threads(1)  # as a run that ended beside a busy process leaves it
    gov = ThreadGovernor(sample=fake_kernel([(0.0, 0.0, 0.0), (0.05, 0.0, 0.05 * MACHINE_THREADS)]))
    assert gov.max_threads == MACHINE_THREADS and gov.pick() == MACHINE_THREADS
    gov.restore()
    assert torch.get_num_threads() == MACHINE_THREADS


def test_without_proc_the_default_is_kept():
    gov = ThreadGovernor(max_threads=2, sample=lambda helpers: None)
    assert gov.pick() == 2


def test_fixed_count_is_never_sampled():
    calls = []
    gov = ThreadGovernor(fixed=3, sample=lambda helpers: calls.append(1))
    assert gov.pick() == 3 and torch.get_num_threads() == 3 and calls == []
    assert governor_for(3).fixed == 3


def test_cuda_runs_keep_torch_default():
    gov = governor_for(None, "cuda")
    assert gov.fixed == torch.get_num_threads()


def test_reward_workers_count_as_our_own_work():
    """A helper's CPU time is gradus' work; another process's is not."""
    if read_sample() is None:
        pytest.skip("no /proc")
    spin = "import time\nwhile time.process_time() < 0.5: pass\nprint('done', flush=True)\ntime.sleep(60)"
    before, before_mine = read_sample(), None
    child = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        before_mine = read_sample([child.pid])
        assert child.stdout.readline().strip() == "done"  # it has used 0.5 s of CPU, however loaded the machine
        after, after_mine = read_sample(), read_sample([child.pid])
    finally:
        child.kill()
        child.wait()
    assert ours_between(before_mine, after_mine) >= 0.3 > ours_between(before, after)


@pytest.mark.skipif(read_sample() is None or (os.cpu_count() or 1) < 2, reason="needs /proc and two cores")
def test_real_busy_process_takes_a_thread():
    """Every other core kept busy by another process: after a unit of real work, fewer threads."""
    cores = os.cpu_count() or 2
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
    try:
        time.sleep(0.3)
        gov = ThreadGovernor(max_threads=cores)
        picks = [gov.pick()]
        a = torch.rand(256, 256)
        for _ in range(3):
            end = time.monotonic() + 0.4
            while time.monotonic() < end:
                a = torch.tanh(a @ a)  # a unit of work at the picked width
            picks.append(gov.pick())
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert all(p < cores for p in picks[1:]), picks


def _digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def test_warm_start_is_bit_identical_at_one_and_two_threads():
    tok = build_char_tokenizer()
    task = get_task("countdown", seed=0)
    digests = []
    for n in (1, 2):
        model = build_tiny_model("micro", tokenizer=tok, seed=0)
        run_sft(model, tok, task, SFTConfig(steps=6, batch_size=32), progress=False, threads=n)
        digests.append(_digest(model))
    assert digests[0] == digests[1]


def test_rl_steps_are_bit_identical_whatever_the_thread_sequence(nano_like_dir, tmp_path, monkeypatch):
    """Two GRPO steps with a reward that separates samples, run at threads (1, 1) and (2, 1) then (1, 2)."""
    (tmp_path / "count_rw.py").write_text(
        "def digits(prompts, completions, **f):\n    return [sum(c.isdigit() for c in x) / 10 for x in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from gradus.train.trainer import Trainer

    digests = []
    for sequence in ((1, 1), (2, 1), (1, 2)):
        cfg = load_config(overrides=[
            f"model.path={nano_like_dir}", f"run.out_dir={tmp_path / 'runs'}", "run.progress=false",
            "task.heldout_size=4", "rollout.prompts_per_step=8", "rollout.group_size=4", "task.rewards=count_rw:digits",
            "run.threads=1"])
        trainer = Trainer(cfg)
        initial = _digest(trainer.policy)
        for step, n in enumerate(sequence, start=1):
            trainer.governor = ThreadGovernor(fixed=n)
            trainer.train_step(step)
        digests.append(_digest(trainer.policy))
        assert digests[-1] != initial  # the steps did train
    assert digests[0] == digests[1] == digests[2]


@pytest.fixture
def nano_like_dir(tmp_path):
    from gradus.models import save_pretrained

    tok = build_char_tokenizer()
    save_pretrained(build_tiny_model("micro", tokenizer=tok, seed=0), tok, tmp_path / "micro")
    return tmp_path / "micro"
