import pytest

from gradus.cli import main
from gradus.demo import run_toy


def test_algos_table_lists_every_preset_and_defaults(capsys):
    assert main(["algos"]) == 0
    out = capsys.readouterr().out
    assert "| clip_high | 0.2 | 0.2 | 0.28 | 0.0004 |" in out
    assert "| tau_neg | - | - | - | - | - | 1.05 |" in out


def test_demo_learns_and_rejects_unknown_algo(capsys):
    before, after = run_toy("grpo", steps=10)
    assert before == pytest.approx(1 / 8) and after > 0.5
    with pytest.raises(ValueError, match="valid algos"):
        main(["demo", "--algos", "grpo,trpo"])
