"""The thread governor: fewer threads when cores are busy elsewhere, and results that do not depend
on the thread count (so following the load changes speed, never the trained model)."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from gradus.config import SFTConfig, load_config
from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.tasks import get_task
from gradus.threads import ThreadGovernor, governor_for
from gradus.train.sft import run_sft


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_regions(monkeypatch, slow_above: int):
    """Regions take 20 us on one thread, 12 us per op when parallel, 20 ms above `slow_above` threads."""
    seen = []

    def region(self, threads, limit=None):
        seen.append(threads)
        return 20e-3 if threads > slow_above else (20e-6 if threads == 1 else 12e-6)

    monkeypatch.setattr(ThreadGovernor, "_region_seconds", region)
    return seen


def test_idle_keeps_every_thread(monkeypatch):
    seen = fake_regions(monkeypatch, slow_above=99)
    gov = ThreadGovernor(max_threads=8)
    assert gov.pick() == 8 and torch.get_num_threads() == 8
    assert seen == [1, 8] and gov.reduced == 0


def test_contention_halves_until_regions_are_fast(monkeypatch):
    seen = fake_regions(monkeypatch, slow_above=2)
    gov = ThreadGovernor(max_threads=8)
    assert gov.pick() == 2 and torch.get_num_threads() == 2
    assert seen == [1, 8, 4, 2] and gov.reduced == 1
    fake_regions(monkeypatch, slow_above=1)
    assert gov.pick() == 1 and gov.reduced == 2


def test_fixed_count_is_never_probed(monkeypatch):
    seen = fake_regions(monkeypatch, slow_above=1)
    gov = governor_for(3)
    assert gov.pick() == 3 and torch.get_num_threads() == 3 and seen == []


def test_cuda_runs_keep_torch_default(monkeypatch):
    seen = fake_regions(monkeypatch, slow_above=1)
    gov = governor_for(None, "cuda")
    assert gov.pick() == torch.get_num_threads() and seen == []


def test_probe_stops_early_once_over_its_limit():
    gov = ThreadGovernor(max_threads=2)
    gov._region_seconds(1)
    # a limit of zero: the first timed op already passes it, so only one op is timed
    assert gov._region_seconds(1, limit=0.0) > 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_real_busy_process_is_seen():
    """With every other core kept busy, regions at full width wait for descheduled threads."""
    cores = os.cpu_count() or 2
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
    try:
        import time

        time.sleep(0.3)
        gov = ThreadGovernor(max_threads=cores)
        picks = [gov.pick() for _ in range(5)]
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert sum(p < cores for p in picks) >= 4, picks


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
