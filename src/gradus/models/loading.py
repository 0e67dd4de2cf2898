"""Save and load model + tokenizer in plain Hugging Face format, from local directories only.

A saved directory is what `transformers` itself writes (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), so `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` read it without gradus. Loading never touches the network
(`local_files_only=True`): gradus runs must not download anything at run time. A directory that is
missing pieces raises `ModelLoadError` naming what was expected and what is there, before
`transformers` gets a chance to fail with a less direct message.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# A tokenizer directory has at least one of these; tokenizer_config.json alone names the class.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


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
    return path


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
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        message = f"could not load {path} ({error}); {_expected()}; found: {_listing(path)}"
        raise ModelLoadError(message) from error
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
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load critic {path} ({error}); found: {_listing(path)}") from error
    return _place(model, device)
