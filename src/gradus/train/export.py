"""`gradus export`: a run's policy as one plain Hugging Face model folder, loadable with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` alone.

The source is a run folder (its newest complete checkpoint), a checkpoint folder, or a policy folder.
A LoRA policy (a PEFT adapter folder) is loaded onto the base model its `adapter_config.json` names and
merged (`merge_and_unload`), then saved with the tokenizer; a full policy is copied file by file (already
plain HF). Either way the folder is written next to `--out` under a temporary name, every file fsync'ed,
then renamed into place: a kill never leaves a half-written `--out`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gradus.config import ConfigError
from gradus.models import check_model_dir, lora
from gradus.models.loading import ModelLoadError
from gradus.train.durable import DiskFull, fsync_dir, fsync_tree, is_disk_full


class ExportError(ValueError):
    """`gradus export` was given a source or destination it cannot use; the message names the path."""


def export_policy(source: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write the policy that `source` stands for to `out` as a plain HF model + tokenizer.
    Returns (the policy folder read, what was done, in words)."""
    from gradus.train.bootstrap import resolve_model_dir

    source, out = Path(source), Path(out)
    if not source.exists():
        raise ExportError(f"{source} does not exist; give a run folder, a checkpoint folder or a policy folder")
    try:
        policy, _ = resolve_model_dir(source, label="export")
    except ConfigError as err:
        raise ExportError(str(err)) from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not an empty folder; give a new folder")
    is_adapter = lora.adapter_base(policy) is not None
    try:
        if is_adapter:
            lora.check_adapter_dir(policy)
        else:
            check_model_dir(policy)
    except ModelLoadError as err:
        raise ExportError(f"{source} holds no policy to export: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if is_adapter:
            model, tokenizer = lora.load_merged(policy)  # in the base model's saved dtype
            model.name_or_path = model.config._name_or_path = ""  # the merged model is its own base
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            done = f"merged the LoRA adapter {policy} into its base model {lora.adapter_base(policy)}"
        else:
            shutil.copytree(policy, tmp)
            done = f"copied the policy {policy} (a full model: no adapter to merge)"
        check_model_dir(tmp)  # what was written loads as a model folder
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # an empty folder (checked above): os.replace cannot rename over it everywhere
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as err:  # nothing half-written stays behind, whatever stopped the export
        full = isinstance(err, OSError | RuntimeError) and is_disk_full(err, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(f"the exported model {out.name}", out.parent) from err
        raise
    return policy, done
