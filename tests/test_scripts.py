"""scripts/make_number_words.py: the user-data example of docs/training.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from make_number_words import words  # noqa: E402


@pytest.mark.parametrize(("n", "text"), [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (21, "twenty-one"), (90, "ninety"),
    (100, "one hundred"), (101, "one hundred one"), (347, "three hundred forty-seven"), (1000, "one thousand"),
    (12_345, "twelve thousand three hundred forty-five"),
    (999_999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
])
def test_words_by_hand(n, text):
    assert words(n) == text


def test_words_out_of_range():
    with pytest.raises(ValueError, match="0..999999"):
        words(1_000_000)


def test_file_is_distinct_seeded_and_loadable(tmp_path):
    out = tmp_path / "numbers.jsonl"
    cmd = [sys.executable, str(SCRIPTS / "make_number_words.py"), "--out", str(out), "--rows", "50"]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50 and len({r["question"] for r in rows}) == 50
    assert all(r["answer"] == words(int(r["question"].split()[1])) for r in rows)
    first = out.read_text()
    subprocess.run(cmd, check=True, capture_output=True)
    assert out.read_text() == first
