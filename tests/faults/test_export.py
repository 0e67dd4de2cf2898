"""`gradus export` given a destination it cannot use, a write that fails, and a run that is still training
(pruning the checkpoint being read). Each ends as one line naming the path and what to do, or exports a
checkpoint that stayed; none is a traceback, a "disk full ... resume the run", or blames the adapter for a
race. Every case here failed on the code before its fix."""

from __future__ import annotations

import errno
import shutil
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradus.cli import main
from gradus.config import ModelConfig
from gradus.models import load_pretrained, lora
from gradus.runtime import hf_writer
from gradus.train import bootstrap
from gradus.train import export as export_module
from gradus.train.checkpoint import save_checkpoint


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- unusable destinations: refused before any work, naming the path and why ---------------------------

def _destinations(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    long = "x" * 300
    cases = [
        ("/dev/null/x", "/dev/null is not a folder"),  # the issue's own example: a parent that is a device file
        (str(a_file / "x"), f"{a_file} is not a folder"),
        (str(a_file / "sub" / "x"), f"{a_file} is not a folder"),
        (str(tmp_path / long), "is 300 bytes, over the 255 its filesystem allows"),
        (str(tmp_path / "new" / long / "x"), "is 300 bytes, over the 255 its filesystem allows"),
    ]
    if sys.platform == "linux":  # pseudo filesystems: no new folders there, whatever the user
        cases += [("/proc/xyz", "/proc does not take new files or folders"),
                  ("/sys/xyz", "no permission to write in /sys")]
    return cases


def test_every_unusable_destination_is_one_line_naming_it(nano_dir, tmp_path, capsys, monkeypatch):
    copies = []
    monkeypatch.setattr(shutil, "copytree", lambda *a, **k: copies.append(a))  # the export's first work
    for out, why in _destinations(tmp_path):
        assert main(["export", str(nano_dir), "--out", out]) == 2, out
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("gradus: export error: --out ") and why in line, line
        assert "give --out a new folder" in line and "disk full" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no folder made on the way is left
    assert not copies


def test_an_out_name_of_255_bytes_exports(nano_dir, tmp_path):
    """The limit is the filesystem's, not a longer temporary name's."""
    out = tmp_path / ("y" * 255)
    assert main(["export", str(nano_dir), "--out", str(out)]) == 0
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


# ---- a write that fails: say what failed; a full disk says "export again", never "resume the run" ------

def _failing_write(monkeypatch, failure, free=None):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(export_module, "fsync_tree", fail)  # the last writes before the rename into place
    if free is not None:  # what /proc reports, or a disk that is really full
        usage = shutil.disk_usage("/")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


def test_a_failed_write_on_a_filesystem_with_no_free_space_says_what_failed(nano_dir, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "out"
    _failing_write(monkeypatch, PermissionError(errno.EACCES, "Permission denied", str(out)), free=0)
    assert main(["export", str(nano_dir), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"gradus: export error: --out {out}: the export failed: permission denied for {out}")
    assert "disk full" not in line and "resume" not in line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4058"),  # no errno: space tells
])
def test_a_full_disk_during_export_says_export_again_not_resume(failure, nano_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _failing_write(monkeypatch, failure, free=4096)
    assert main(["export", str(nano_dir), "--out", str(out)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"gradus: disk full while writing the exported model out in {tmp_path}")
    assert line.endswith("free some space, then run gradus export again") and "resume" not in line
    assert not any(tmp_path.iterdir())


# ---- a LoRA run still training: its trainer prunes the checkpoint being read ----------------------------

def _adapter(nano_dir, seed: int):
    """The nano model with a rank-4 adapter drawn from `seed` (an adapter that changes the model)."""
    base, tokenizer = load_pretrained(nano_dir)
    return _draw(lora.apply_lora(base, ModelConfig(lora_r=4, lora_targets="q_proj,v_proj")), seed), tokenizer


def _draw(model, seed: int):
    """Set every adapter weight of `model` from `seed` (A too: PEFT draws it from the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _save(run, nano_dir, step: int, keep: int):
    """What the trainer does at step `step`: save, then prune to the newest `keep`."""
    save_checkpoint(run, step, writers={"policy": hf_writer(*_adapter(nano_dir, step))}, state={}, keep=keep)


def _assert_exports_step(out, nano_dir, step: int) -> None:
    exported = AutoModelForCausalLM.from_pretrained(out)
    expected = lora.merged_copy(_adapter(nano_dir, step)[0])
    for (name, a), b in zip(expected.named_parameters(), exported.parameters(), strict=True):
        assert torch.equal(a, b), (step, name)


def test_a_checkpoint_pruned_between_resolve_and_read_is_read_again_from_the_newest(nano_dir, tmp_path, capsys,
                                                                                     monkeypatch):
    run = tmp_path / "run"
    for step in (1, 2):
        _save(run, nano_dir, step, keep=2)
    real = bootstrap.resolve_model_dir
    pruned = []

    def resolve_then_train_on(path, **kwargs):  # the trainer saves step 3 (keep 1) right after export looked
        found = real(path, **kwargs)
        if not pruned:
            pruned.append(found[0])
            _save(run, nano_dir, 3, keep=1)
        return found

    monkeypatch.setattr(bootstrap, "resolve_model_dir", resolve_then_train_on)
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert pruned == [run / "checkpoints" / "step-000002" / "policy"]
    assert f"gradus: checkpoint {run / 'checkpoints' / 'step-000002'} was removed by its run" in err
    assert f"merged the LoRA adapter {run / 'checkpoints' / 'step-000003' / 'policy'}" in err
    assert "adapter_config" not in err
    _assert_exports_step(out, nano_dir, 3)


def test_a_checkpoint_named_by_its_folder_and_pruned_says_so(nano_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _save(run, nano_dir, 1, keep=2)
    ckpt = run / "checkpoints" / "step-000001"
    real = bootstrap.resolve_model_dir
    monkeypatch.setattr(bootstrap, "resolve_model_dir",
                        lambda path, **k: (real(path, **k), _save(run, nano_dir, 2, keep=1))[0])
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"gradus: export error: {ckpt} was removed while it was read: its run is still training")
    assert "give the run folder" in line and not (tmp_path / "out").exists()


def test_export_while_a_trainer_saves_and_prunes_every_few_milliseconds(nano_dir, tmp_path, capsys):
    """A real race: a thread saves a checkpoint and prunes the one before (keep 1) every 10 ms while four exports
    read the run. Before the fix one of the four at least failed in each of 5 tries ("Can't find
    'adapter_config.json'", or "holds no policy"); now each exports one complete checkpoint, exactly."""
    run = tmp_path / "run"
    _save(run, nano_dir, 1, keep=1)
    model, tokenizer = _adapter(nano_dir, 0)  # loaded here: transformers' loading is not thread-safe
    stop = threading.Event()

    def trainer():
        step = 2
        while not stop.is_set():
            save_checkpoint(run, step, writers={"policy": hf_writer(_draw(model, step), tokenizer)}, state={}, keep=1)
            step += 1
            time.sleep(0.01)

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    try:
        results = []
        for i in range(4):
            out = tmp_path / f"out{i}"
            results.append((main(["export", str(run), "--out", str(out)]), out, capsys.readouterr().err))
    finally:
        stop.set()
        thread.join()
    for code, out, err in results:
        assert code == 0, err
        step = int(err.split("merged the LoRA adapter ")[1].split("/policy")[0].rsplit("step-", 1)[1])
        _assert_exports_step(out, nano_dir, step)
