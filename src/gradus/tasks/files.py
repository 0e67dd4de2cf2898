"""Tasks read from a file of problems: JSONL, Parquet or CSV, loaded through ``datasets``.

Each row needs a non-empty string prompt (``prompt_field``) and an answer (``answer_field``: a string, or
a number, which is turned into a string; a float with an integer value is written without ".0", since
the JSON loader turns 3 into 3.0 in a column that also holds 2.5). Bad rows are reported with the file and
the 1-based row number (and, for JSONL, the line number): ``on_error="raise"`` raises DatasetError listing
them; ``on_error="skip"`` drops them with one warning that counts them and lists the first few.

CSV cells are read as strings (``converters=str``) so "007" or "1/2" survive. If ``datasets`` cannot read a
JSONL file at all (invalid JSON on some line; its JSON reader also fails on blank lines in some
mixed-type files) the lines are parsed one by one with ``json`` so the bad line can be named.

Text files (JSONL, JSON, CSV) must be UTF-8: a line that is not is named with its line number and byte
offset. ``on_error="skip"`` drops such lines of a JSONL or CSV file like bad rows (a .json file cannot be
cut into lines, so it always raises).

Held-out split: a separate ``heldout_path`` file (training rows with the same prompt are dropped), or a
share of the distinct prompts chosen by a permutation seeded with ``split_seed`` (not the training
``seed``, so runs with different seeds share one held-out set): ``heldout_size`` prompts, but never more
than ``heldout_fraction`` of them (so a file of 40 prompts holds out 8, not the 500 a config asks for), and
always at least one prompt on each side; without ``heldout_size``, the whole ``heldout_fraction``.
``split_note`` says in one line what was chosen and why. Training order: a fresh seeded permutation of the
training rows per epoch, so ``train_example(index)`` needs only the index.

``check_rows(problem)`` applies a check that needs more than the file (a tokenizer, a model's positions)
to every row, with the same ``on_error`` handling as bad rows.
"""

from __future__ import annotations

import codecs
import json
import math
import random
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from gradus.tasks.base import Example, Task, check_index, seeded_rng

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
_SHOW_FIRST = 5
# Fewer distinct held-out problems than this: held-out accuracy moves in steps too large to read.
_FEW_HELDOUT = 10


class DatasetError(ValueError):
    """A problem file is empty, unreadable, or has bad rows (the message names file and rows)."""


def _utf8_lines(path: Path) -> tuple[list[tuple[int, str | None]], list[str]]:
    """Every line of a text file as (1-based line number, its text, or None when it is not UTF-8), and a
    message for each line that is not (with the byte offset of the first bad byte in the file)."""
    lines: list[tuple[int, str | None]] = []
    bad: list[str] = []
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text: str | None = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = None
                bad.append(f"{path}: line {number} (byte {offset + exc.start}): not valid UTF-8 ({exc.reason}); "
                           "re-save the file as UTF-8")
            if number == 1 and text is not None:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first row
            lines.append((number, text))
            offset += len(raw)
    return lines, bad


def _is_utf8(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8 (read in chunks; no line splitting unless it does not)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _read_jsonl_lines(path: Path) -> tuple[list[Any], list[int], list[str]]:
    """Rows of a JSONL file parsed line by line: (rows, their 1-based line numbers, bad-line messages)."""
    rows, lines = [], []
    numbered, bad = _utf8_lines(path)
    for number, line in numbered:
        if line is None or not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            lines.append(number)
        except json.JSONDecodeError as exc:
            bad.append(f"{path}: line {number}: invalid JSON ({exc.msg})")
    return rows, lines, bad


def _utf8_copy(path: Path, on_error: str, folder: str) -> tuple[Path, list[str]]:
    """A text file that is not all UTF-8: raise naming its bad lines, or (skip) a copy without them."""
    numbered, bad = _utf8_lines(path)
    listing = "\n  ".join(bad[:_SHOW_FIRST]) + ("\n  ..." if len(bad) > _SHOW_FIRST else "")
    if on_error == "raise" or path.suffix.lower() == ".json":
        raise DatasetError(f"{len(bad)} line(s) of {path} are not valid UTF-8:\n  {listing}")
    copy = Path(folder) / path.name
    copy.write_text("".join(text for _, text in numbered if text is not None), encoding="utf-8")
    return copy, bad


def _load_rows(
    path: Path, columns: Sequence[str], cache_dir: str | None, on_error: str
) -> tuple[list[Any], list[str], list[str]]:
    """(rows as dicts or raw values, where-strings for each row, bad-line messages)."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty")
    if path.suffix.lower() == ".jsonl" and not _is_utf8(path):
        rows, lines, bad = _read_jsonl_lines(path)  # the lines that are not UTF-8 are bad rows
        return rows, [f"row {i + 1} (line {n})" for i, n in enumerate(lines)], bad
    if path.suffix.lower() in _TEXT_SUFFIXES and not _is_utf8(path):
        with tempfile.TemporaryDirectory(prefix="gradus-utf8-") as folder:
            copy, bad = _utf8_copy(path, on_error, folder)
            rows, where, more = _read_with_datasets(path, copy, fmt, columns, cache_dir)
        return rows, where, bad + more
    return _read_with_datasets(path, path, fmt, columns, cache_dir)


def _read_with_datasets(
    path: Path, source: Path, fmt: str, columns: Sequence[str], cache_dir: str | None
) -> tuple[list[Any], list[str], list[str]]:
    """_load_rows for a readable file: ``source`` is ``path`` itself or a UTF-8 copy of it (named as ``path``)."""
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"converters": {c: str for c in columns}} if fmt == "csv" else {}
    try:
        ds = load_dataset(fmt, data_files=str(source), split="train", cache_dir=cache_dir, **kwargs)
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


def _row_problem(
    row: Any, prompt_field: str, answer_field: str, meta_fields: Sequence[str], source: str
) -> Example | str:
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
    return Example(prompt=prompt.strip(), answer=answer, meta={name: row[name] for name in meta_fields},
                   source=source)


class FileTask(Task):
    """Problems from a JSONL / Parquet / CSV file (behaviour in the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        prompt_field: str = "question",
        answer_field: str = "answer",
        template: str = "{prompt}",
        heldout_fraction: float = 0.2,
        heldout_size: int | None = None,
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
        if heldout_size is not None and heldout_size < 1:
            raise ValueError(f"heldout_size must be >= 1, got {heldout_size}")
        if "{prompt}" not in template:
            raise ValueError("template must contain '{prompt}'")
        self.name = name
        self.default_reward = default_reward
        self.template = template
        self.seed = seed
        self._fields = (prompt_field, answer_field, tuple(meta_fields))
        self._on_error = on_error
        self._cache_dir = cache_dir
        self.path = Path(path)
        examples = self._load(self.path)
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
            self.split_note = (f"{self.path.name}: training on {len(self._train)} rows; held out the "
                               f"{len(self._heldout)} rows of {heldout_path}")
        else:
            self._train, self._heldout, self.split_note = _split(
                examples, heldout_fraction, heldout_size, split_seed, self.path.name)
        if not self._train:
            raise DatasetError(f"{path}: no training rows left after the held-out split")
        self._perm_cache: dict[int, list[int]] = {}
        # where each row stands in its file(s), so messages list bad rows in file order
        self._order = {id(ex): i for i, ex in enumerate(examples + (self._heldout if heldout_path else []))}

    def _load(self, path: Path) -> list[Example]:
        prompt_field, answer_field, meta_fields = self._fields
        columns = [prompt_field, answer_field, *meta_fields]
        rows, where, bad = _load_rows(path, columns, self._cache_dir, self._on_error)
        examples: list[Example] = []
        for row, at in zip(rows, where, strict=True):
            problem = _row_problem(row, prompt_field, answer_field, meta_fields, f"{path}: {at}")
            if isinstance(problem, Example):
                examples.append(problem)
            else:
                bad.append(f"{path}: {at}: {problem}")
        self._report(bad, f"bad row(s) in {path}")
        if not examples:
            raise DatasetError(f"{path}: no usable rows (the dataset is empty)")
        return examples

    def _report(self, bad: list[str], what: str) -> None:
        """Raise DatasetError listing ``bad`` (on_error="raise"), or warn once that they were skipped."""
        if not bad:
            return
        listing = "\n  ".join(bad[:_SHOW_FIRST]) + ("\n  ..." if len(bad) > _SHOW_FIRST else "")
        if self._on_error == "raise":
            raise DatasetError(f"{len(bad)} {what}:\n  {listing}")
        warnings.warn(f"skipped {len(bad)} {what}; first:\n  {listing}", stacklevel=4)

    def check_rows(self, problems: Callable[[list[Example]], list[str | None]], what: str) -> int:
        """Check every row (training and held-out) with ``problems`` (for a list of rows, the reason each
        cannot be used, or None); ``what`` names the check in messages ("are too long"). Bad rows raise
        DatasetError naming file and row (on_error="raise") or are dropped with one warning
        (on_error="skip"). Returns how many rows were dropped."""
        kept_train: list[Example] = []
        kept_held: list[Example] = []
        found: list[tuple[int, str]] = []
        for examples, kept in ((self._train, kept_train), (self._heldout, kept_held)):
            for ex, reason in zip(examples, problems(examples), strict=True):
                if reason is None:
                    kept.append(ex)
                else:
                    found.append((self._order.get(id(ex), 0), f"{ex.source}: {reason}"))
        bad = [message for _, message in sorted(found)]
        self._report(bad, f"row(s) of {self.path} {what}")
        if not bad:
            return 0
        if not kept_train:
            raise DatasetError(f"{self.path}: no training rows left: every one {what}")
        dropped_held = len(self._heldout) - len(kept_held)
        self._train, self._heldout = kept_train, kept_held
        self._perm_cache.clear()
        self.split_note += (f"; then skipped {len(bad)} row(s) that {what} ({dropped_held} of them held out): "
                            f"training on {len(self._train)} rows, {len(self._heldout)} held out")
        return len(bad)

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
        """The first ``n`` held-out rows, or all of them when the file holds out fewer: its held-out set was
        cut once, when the file was split (``split_note`` says how)."""
        return list(self._heldout[:n])

    def plain_prompt(self, example: Example) -> str:
        # str.replace, not str.format: templates often contain literal braces such as "\boxed{}".
        return self.template.replace("{prompt}", example.prompt)


def heldout_count(distinct: int, fraction: float, size: int | None) -> int:
    """How many of ``distinct`` prompts to hold out. Without ``size`` (the old rule): a ``fraction`` share,
    rounded up. With it: ``size``, but at most the share rounded down (and at least one). Always at least one
    prompt is left to train on."""
    if fraction <= 0:
        return 0
    if size is None:
        return min(math.ceil(fraction * distinct), distinct - 1)
    return min(size, max(1, math.floor(fraction * distinct)), distinct - 1)


def _split(
    examples: list[Example], fraction: float, size: int | None, split_seed: int, name: str
) -> tuple[list[Example], list[Example], str]:
    """(train, held-out, what was chosen and why): a seeded set of ``heldout_count`` DISTINCT prompts is
    held out, with all their rows."""
    prompts = sorted({ex.prompt for ex in examples})
    distinct = len(prompts)
    if size is not None and fraction > 0 and distinct < 2:
        raise DatasetError(f"{name}: only {distinct} distinct prompt; a run needs at least 2 (one to train on, "
                           "one to hold out for evaluation)")
    random.Random(f"file-split:{split_seed}").shuffle(prompts)
    n_held = heldout_count(distinct, fraction, size)
    held = set(prompts[:n_held])
    train = [ex for ex in examples if ex.prompt not in held]
    note = (f"{name}: {distinct} distinct prompts; held out {n_held} ({n_held / distinct:.0%}), "
            f"training on {distinct - n_held}")
    if len(examples) != distinct:
        note += f" ({len(train)} of {len(examples)} rows)"
    if size is not None and n_held < size:
        note += (f" (asked for {size}; a file holds out at most {fraction:.0%} of its distinct prompts, "
                 "and at least one)")
    if size is not None and 0 < n_held < min(size, _FEW_HELDOUT):
        warnings.warn(f"{name}: held-out accuracy on {n_held} problem(s) means little (it moves in steps of "
                      f"{1 / n_held:.0%}); a file with more distinct prompts gives a better measure", stacklevel=3)
    return train, [ex for ex in examples if ex.prompt in held], note
