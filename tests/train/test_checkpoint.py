import torch

from gradus.models import build_char_tokenizer, build_tiny_model
from gradus.train.checkpoint import latest_checkpoint, load_state, save_checkpoint


def test_atomic_save_and_latest(tmp_path, monkeypatch):
    tok = build_char_tokenizer()
    model = build_tiny_model("nano", tokenizer=tok)
    save_checkpoint(tmp_path, 1, models={"policy": (model, tok)}, state={"x": 1})
    assert latest_checkpoint(tmp_path).name == "step-000001"

    # a crash in the middle of writing step 2 leaves step 1 as the latest complete checkpoint
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    try:
        save_checkpoint(tmp_path, 2, models={"policy": (model, tok)}, state={"x": 2})
    except OSError:
        pass
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    save_checkpoint(tmp_path, 3, models={"policy": (model, tok)}, state={"x": 3}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000003"]  # the stale temporary folder is gone
    assert load_state(latest_checkpoint(tmp_path))["x"] == 3
