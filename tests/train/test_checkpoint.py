import torch

from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.runtime import hf_writer
from gradus.train.checkpoint import latest_checkpoint, load_state, save_checkpoint


def test_atomic_save_and_latest(tmp_path, monkeypatch):
    tok = build_char_tokenizer()
    model = build_tiny_model("nano", tokenizer=tok)
    save_checkpoint(tmp_path, 1, writers={"policy": hf_writer(model, tok)}, state={"x": 1})
    assert latest_checkpoint(tmp_path).name == "step-000001"

    # a crash in the middle of writing step 2 leaves step 1 as the latest complete checkpoint
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    try:
        save_checkpoint(tmp_path, 2, writers={"policy": hf_writer(model, tok)}, state={"x": 2})
    except OSError:
        pass
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())  # removed on failure
    save_checkpoint(tmp_path, 3, writers={"policy": hf_writer(model, tok)}, state={"x": 3}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000003"]
    assert load_state(latest_checkpoint(tmp_path))["x"] == 3


def test_latest_checks_the_manifest_and_falls_back(tmp_path):
    tok = build_char_tokenizer()
    model = build_tiny_model("nano", tokenizer=tok)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, writers={"policy": hf_writer(model, tok)}, state={"x": step}, keep=3)
    root = tmp_path / "checkpoints"
    with (root / "step-000003" / "state.pt").open("r+b") as f:
        f.truncate(10)  # cut short: the manifest's size no longer matches
    (root / "step-000002" / "COMPLETE").write_text("2")  # an older gradus' marker: only the step
    skipped = []
    assert latest_checkpoint(tmp_path, echo=skipped.append).name == "step-000002"
    assert len(skipped) == 1 and "state.pt" in skipped[0] and "step-000003" in skipped[0]
    # the next save prunes the broken one and any checkpoint newer than itself (an abandoned history)
    save_checkpoint(tmp_path, 2, writers={"policy": hf_writer(model, tok)}, state={"x": 22}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]
    assert load_state(latest_checkpoint(tmp_path))["x"] == 22
