"""Tasks read from a file of problems: JSONL, Parquet or CSV, loaded through ``datasets``.

Each row needs a non-empty string prompt (``prompt_field``) and an answer (``answer_field``: a string, or
a number, which is turned into a string; a float with an integer value is written without ".0", since
the JSON loader turns 3 into 3.0 in a column that also holds 2.5). Bad rows are reported with the file and
the 1-based row number (and, for JSONL, the line number): ``on_error="raise"`` raises DatasetError listing
them; ``on_error="skip"`` drops them with one warning that counts them and lists the first few.

CSV cells are read as strings (``converters=str``) so "007" or "1/2" survive. If ``datasets`` cannot read a
JSONL file at all (invalid JSON on some line; its JSON reader also fails on blank lines in some
mixed-type files) the lines are parsed one by one with ``json`` so the bad line can be named.

Held-out split: a separate ``heldout_path`` file (training rows with the same prompt are dropped), or a
``heldout_fraction`` of the distinct prompts chosen by a permutation seeded with ``split_seed`` (not the
training ``seed``, so runs with different seeds share one held-out set). Training order: a fresh seeded
permutation of the training rows per epoch, so ``train_example(index)`` needs only the index.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from gradus.tasks.base import Example, Task, check_index, seeded_rng

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SHOW_FIRST = 5


class DatasetError(ValueError):
    """A problem file is empty, unreadable, or has bad rows (the message names file and rows)."""


def _read_jsonl_lines(path: Path) -> tuple[list[Any], list[int], list[str]]:
    """Rows of a JSONL file parsed line by line: (rows, their 1-based line numbers, bad-line messages)."""
    rows, lines, bad = [], [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
                lines.append(number)
            except json.JSONDecodeError as exc:
                bad.append(f"{path}: line {number}: invalid JSON ({exc.msg})")
    return rows, lines, bad


def _load_rows(path: Path, columns: Sequence[str], cache_dir: str | None) -> tuple[list[Any], list[str]]:
    """(rows as dicts or raw values, where-strings for each row, bad-line messages)."""
    from datasets import load_dataset

    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty")
    kwargs: dict[str, Any] = {"converters": {c: str for c in columns}} if fmt == "csv" else {}
    try:
        ds = load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as exc:
        if path.suffix.lower() != ".jsonl":
            raise DatasetError(f"{path}: cannot read as {fmt}: {exc}") from exc
        rows, lines, bad = _read_jsonl_lines(path)
        return rows, [f"row {i + 1} (line {n})" for i, n in enumerate(lines)], bad
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DatasetError(f"{path}: no column(s) {missing}; the file has {ds.column_names}")
    data = {c: ds[c] for c in columns}
    rows = [{c: data[c][i] for c in columns} for i in range(len(ds))]
    if fmt == "json" and path.suffix.lower() == ".jsonl":
        _, lines, _ = _read_jsonl_lines(path)
        if len(lines) == len(rows):
            return rows, [f"row {i + 1} (line {n})" for i, n in enumerate(lines)], []
    return rows, [f"row {i + 1}" for i in range(len(rows))], []


def _answer_text(value: Any) -> str | None:
    """The answer as a string, or None when it is missing or of a type that cannot be an answer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _row_problem(row: Any, prompt_field: str, answer_field: str, meta_fields: Sequence[str]) -> Example | str:
    """An Example from one row, or the reason the row is bad."""
    if not isinstance(row, dict):
        return f"expected an object with fields, got {type(row).__name__}"
    prompt = row.get(prompt_field)
    if prompt is None:
        return f"missing field {prompt_field!r}"
    if not isinstance(prompt, str):
        return f"field {prompt_field!r} must be a string, got {type(prompt).__name__}"
    if not prompt.strip():
        return f"empty prompt in field {prompt_field!r}"
    raw_answer = row.get(answer_field)
    if raw_answer is None:
        return f"missing field {answer_field!r}"
    answer = _answer_text(raw_answer)
    if answer is None:
        return f"field {answer_field!r} must be a non-empty string or a number, got {raw_answer!r:.60}"
    for name in meta_fields:
        if row.get(name) is None:
            return f"missing field {name!r}"
    return Example(prompt=prompt.strip(), answer=answer, meta={name: row[name] for name in meta_fields})


class FileTask(Task):
    """Problems from a JSONL / Parquet / CSV file (behaviour in the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        prompt_field: str = "question",
        answer_field: str = "answer",
        template: str = "{prompt}",
        heldout_fraction: float = 0.1,
        heldout_path: str | Path | None = None,
        seed: int = 0,
        split_seed: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
        meta_fields: Sequence[str] = (),
        default_reward: str = "exact_match",
        name: str = "file",
        cache_dir: str | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0 <= heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        if "{prompt}" not in template:
            raise ValueError("template must contain '{prompt}'")
        self.name = name
        self.default_reward = default_reward
        self.template = template
        self.seed = seed
        self._fields = (prompt_field, answer_field, tuple(meta_fields))
        self._on_error = on_error
        self._cache_dir = cache_dir
        examples = self._load(Path(path))
        if heldout_path is not None:
            self._heldout = self._load(Path(heldout_path))
            held_prompts = {ex.prompt for ex in self._heldout}
            self._train = [ex for ex in examples if ex.prompt not in held_prompts]
            if len(self._train) < len(examples):
                warnings.warn(
                    f"{path}: dropped {len(examples) - len(self._train)} training rows whose prompt is in "
                    f"the held-out file {heldout_path}",
                    stacklevel=2,
                )
        else:
            self._train, self._heldout = _split(examples, heldout_fraction, split_seed)
        if not self._train:
            raise DatasetError(f"{path}: no training rows left after the held-out split")
        self._perm_cache: dict[int, list[int]] = {}

    def _load(self, path: Path) -> list[Example]:
        prompt_field, answer_field, meta_fields = self._fields
        columns = [prompt_field, answer_field, *meta_fields]
        rows, where, bad = _load_rows(path, columns, self._cache_dir)
        examples: list[Example] = []
        for row, at in zip(rows, where, strict=True):
            problem = _row_problem(row, prompt_field, answer_field, meta_fields)
            if isinstance(problem, Example):
                examples.append(problem)
            else:
                bad.append(f"{path}: {at}: {problem}")
        if bad:
            listing = "\n  ".join(bad[:_SHOW_FIRST]) + ("\n  ..." if len(bad) > _SHOW_FIRST else "")
            if self._on_error == "raise":
                raise DatasetError(f"{len(bad)} bad row(s) in {path}:\n  {listing}")
            warnings.warn(f"skipped {len(bad)} bad row(s) in {path}; first:\n  {listing}", stacklevel=3)
        if not examples:
            raise DatasetError(f"{path}: no usable rows (the dataset is empty)")
        return examples

    @property
    def num_train(self) -> int:
        return len(self._train)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:  # epochs are visited in order; keep memory bounded
                self._perm_cache.clear()
            order = list(range(len(self._train)))
            seeded_rng(self.name, "epoch", self.seed, epoch).shuffle(order)
            self._perm_cache[epoch] = order
        return self._perm_cache[epoch]

    def train_example(self, index: int) -> Example:
        check_index(index)
        epoch, position = divmod(index, len(self._train))
        return self._train[self._permutation(epoch)[position]]

    def heldout(self, n: int | None = None) -> list[Example]:
        if n is not None and n > len(self._heldout):
            raise ValueError(f"{self.name}: asked for {n} held-out examples, there are {len(self._heldout)}")
        return list(self._heldout[:n])

    def plain_prompt(self, example: Example) -> str:
        # str.replace, not str.format: templates often contain literal braces such as "\boxed{}".
        return self.template.replace("{prompt}", example.prompt)


def _split(examples: list[Example], fraction: float, split_seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded ``fraction`` of the DISTINCT prompts is held out, with all their rows."""
    prompts = sorted({ex.prompt for ex in examples})
    random.Random(f"file-split:{split_seed}").shuffle(prompts)
    n_held = math.ceil(fraction * len(prompts)) if fraction > 0 else 0
    n_held = min(n_held, len(prompts) - 1)
    held = set(prompts[:n_held])
    return [ex for ex in examples if ex.prompt not in held], [ex for ex in examples if ex.prompt in held]
