"""Save and load model + tokenizer in plain Hugging Face format, from local directories only.

A saved directory is what `transformers` itself writes (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), so `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` read it without gradus. Loading never touches the network
(`local_files_only=True`): gradus runs must not download anything at run time. A directory that is
missing pieces raises `ModelLoadError` naming what was expected and what is there, before
`transformers` gets a chance to fail with a less direct message. So does a weights file that is
truncated or corrupt (its header is checked against its size), and weights holding NaN or inf.

`check_special_tokens` says what a tokenizer lacks for sampling: no EOS the model can emit means every
completion runs to max_new_tokens (a warning); no EOS and no PAD leaves nothing to pad with (an error).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# A tokenizer directory has at least one of these; tokenizer_config.json alone names the class.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# model.dtype and rollout.dtype by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model directory is missing, incomplete or unreadable."""


def _listing(path: Path) -> str:
    names = sorted(entry.name for entry in path.iterdir())
    return ", ".join(names) if names else "nothing (empty directory)"


def _expected() -> str:
    return ("expected a local Hugging Face model directory with config.json, *.safetensors weights "
            "(model.safetensors or a sharded model.safetensors.index.json) and tokenizer files "
            f"({' or '.join(_TOKENIZER_FILES)})")


def check_model_dir(path: str | Path, *, need_tokenizer: bool = True) -> Path:
    """Raise `ModelLoadError` unless `path` looks like a complete saved model; return it as a Path."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist; {_expected()}")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a directory; {_expected()}")
    problems = []
    if not (path / "config.json").is_file():
        problems.append("no config.json")
    if not any(path.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if need_tokenizer and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        problems.append("no tokenizer files")
    if problems:
        raise ModelLoadError(f"{path}: {'; '.join(problems)}; {_expected()}; found: {_listing(path)}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelLoadError(f"{index} is corrupt ({error}); re-download or re-save the model") from error
        missing = sorted(name for name in shards if not (path / name).is_file())
        if missing:
            raise ModelLoadError(f"{path}: weight shard(s) {', '.join(missing)} named in {index.name} are missing")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    return path


def check_safetensors(path: Path) -> None:
    """Raise `ModelLoadError` unless the file's header parses and its tensors end exactly at the end of the
    file (the format: an 8-byte little-endian header length, a JSON header of tensor offsets, the data)."""
    size = path.stat().st_size
    fix = "re-download or re-save the model"
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path} is truncated ({size} bytes, not even a header); {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ModelLoadError(f"{path} is truncated or corrupt: its header claims {header_len} bytes, the "
                                 f"file has {size}; {fix}")
        try:
            header = json.loads(handle.read(header_len))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise ModelLoadError(f"{path} is corrupt: its header is not a safetensors header ({error}); "
                                 f"{fix}") from error
    data = size - 8 - header_len
    need = max(ends, default=0)
    if need > data:
        raise ModelLoadError(f"{path} is truncated: its tensors need {need} bytes of data, the file holds "
                             f"{data} ({size} bytes in all, {need - data} missing); {fix}")
    if need < data:
        raise ModelLoadError(f"{path} is corrupt: {data - need} bytes after its last tensor; {fix}")


def check_finite(model: torch.nn.Module, path: str | Path) -> None:
    """Raise `ModelLoadError` naming every parameter that holds NaN or inf."""
    bad = [name for name, param in model.named_parameters() if not bool(torch.isfinite(param).all())]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ModelLoadError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf: {shown}; the model cannot "
                             "sample (a checkpoint saved after a diverged update, or a bad conversion?)")


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the model's generation_config EOS ids,
    keeping only ids the model can emit (inside its vocabulary)."""
    vocab = model.get_input_embeddings().num_embeddings
    generation = getattr(model, "generation_config", None)
    found = getattr(generation, "eos_token_id", None) if generation is not None else None
    candidates = [tokenizer.eos_token_id, *(found if isinstance(found, list | tuple) else [found])]
    ids: list[int] = []
    for token in candidates:
        if isinstance(token, int) and 0 <= token < vocab and token not in ids:
            ids.append(token)
    return ids


def check_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Warn when no EOS id stops sampling; raise `ModelLoadError` when there is nothing to pad with either.
    A tokenizer without a usable PAD token gets the first EOS id as its pad token."""
    vocab = model.get_input_embeddings().num_embeddings
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    usable_pad = isinstance(pad, int) and 0 <= pad < vocab
    config = Path(path) / "tokenizer_config.json"
    if not stops and not usable_pad:
        raise ModelLoadError(
            f"{path}: the tokenizer has no EOS and no PAD token the model can use (eos_token="
            f"{tokenizer.eos_token!r}, pad_token={tokenizer.pad_token!r}, the model has {vocab} token ids): "
            f'set "eos_token" (the token that ends an answer) and "pad_token" in {config}')
    if not stops:
        warnings.warn(
            f"{path}: the tokenizer has no EOS token the model can emit (eos_token={tokenizer.eos_token!r}), so "
            f'every completion runs to rollout.max_new_tokens; set "eos_token" in {config}', stacklevel=2)
    elif not usable_pad:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(stops[0])


def save_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | Path
) -> Path:
    """Write model (safetensors) and tokenizer to `path` in HF format; return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _place(model: PreTrainedModel, device: str | torch.device | None) -> PreTrainedModel:
    return model if device is None else model.to(device)


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory.

    dtype None keeps the dtype recorded in the checkpoint's config (transformers' "auto");
    device None leaves the model where transformers puts it (CPU).
    """
    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype if dtype is not None else "auto"
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        message = f"could not load {path} ({error}); {_expected()}; found: {_listing(path)}"
        raise ModelLoadError(message) from error
    check_finite(model, path)
    return _place(model, device), tokenizer


def load_critic(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a critic saved with `save_pretrained(critic, None, path)` (a token-classification model)."""
    path = check_model_dir(path, need_tokenizer=False)
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            path, local_files_only=True, dtype=dtype if dtype is not None else "auto"
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(f"could not load critic {path} ({error}); found: {_listing(path)}") from error
    check_finite(model, path)
    return _place(model, device)
