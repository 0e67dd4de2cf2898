"""scripts/make_number_words.py (the user-data example of docs/training.md) and scripts/feature_files.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import feature_files  # noqa: E402
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


@pytest.mark.parametrize("feature", list(feature_files.FEATURES))
def test_each_feature_touches_few_files(feature, monkeypatch):
    # docs/architecture.md lists these files; a new one is a feature leaking into code that should not know it
    monkeypatch.chdir(SCRIPTS.parent)
    files = feature_files.touches(feature)
    assert len(files) <= feature_files.MOST, files
    assert all(f"`{f}`" in (SCRIPTS.parent / "docs" / "architecture.md").read_text() for f in files), files
