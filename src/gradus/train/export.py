"""`gradus export`: a run's policy as one plain Hugging Face model folder, loadable with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` alone.

The source is a run folder (its newest complete checkpoint), a checkpoint folder, or a policy folder.
A LoRA policy (a PEFT adapter folder) is loaded onto the base model its `adapter_config.json` names and
merged (`merge_and_unload`), then saved with the tokenizer; a full policy is copied file by file (already
plain HF). Either way the folder is written next to `--out` under a temporary name, every file fsync'ed,
then renamed into place: a kill never leaves a half-written `--out`.

1. The destination is checked before any work: every folder on the way to `--out` is a folder (or is made),
   and `--out` and the temporary name can be created there; an unusable one (a parent that is a file, a
   name longer than the filesystem allows, no permission, a read-only or pseudo filesystem) is an
   `ExportError` naming it and why.
2. A run that is still training prunes its old checkpoints, so the policy is read from a checkpoint that
   stays: its folder is copied (the adapter alone, a few MB, is copied before it is merged; a full policy's
   copy is the export), and the copy is kept only if the checkpoint's folder was the same one (by inode)
   before and after it. The trainer renames a checkpoint away before deleting it and never renames one
   back, so an unchanged folder was not pruned or replaced meanwhile, and its files are never rewritten.
   Given a run folder, a pruned checkpoint is read again as the run's newest complete one (said on
   stderr); a checkpoint given by name cannot be, and is an `ExportError` saying so.
3. A write that fails is an `ExportError` saying what failed; a full disk is `DiskFull` (ENOSPC, or torch's
   and safetensors' errno-less errors with little space left), never a "resume the run".
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from gradus.config import ConfigError
from gradus.models import check_model_dir, lora
from gradus.models.loading import ModelLoadError
from gradus.train.checkpoint import checkpoint_dir
from gradus.train.durable import DiskFull, fsync_dir, fsync_tree, is_disk_full

# Times a run folder's newest checkpoint is read again when the running trainer pruned it during the read.
READS = 5
AGAIN = "Nothing half-written was left: free some space, then run gradus export again"


class ExportError(ValueError):
    """`gradus export` was given a source or destination it cannot use; the message names the path."""


def export_policy(source: str | Path, out: str | Path,
                  echo: Callable[[str], None] | None = None) -> tuple[Path, str]:
    """Write the policy that `source` stands for to `out` as a plain HF model + tokenizer. `echo` (default:
    standard error) hears about a checkpoint read again. Returns (the policy folder read, what was done)."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise ExportError(f"{source} does not exist; give a run folder, a checkpoint folder or a policy folder")
    first = _resolve(source)  # a source with no policy is refused before --out is touched
    tmp, made = _claim(out)
    staged = tmp.with_name(f"{tmp.name}-adapter")
    try:
        policy, is_adapter = _copy_policy(source, first, tmp, echo or _stderr)
        if is_adapter:  # merge from the copy: the trainer may prune the checkpoint at any moment now
            os.replace(tmp, staged)
            base = lora.adapter_base(staged)
            try:
                model, tokenizer = lora.load_merged(staged)  # in the base model's saved dtype
            except ModelLoadError as err:
                raise ExportError(f"{source} holds no policy to export: "
                                  f"{str(err).replace(str(staged), str(policy))}") from None
            model.name_or_path = model.config._name_or_path = ""  # the merged model is its own base
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            done = f"merged the LoRA adapter {policy} into its base model {base}"
        else:
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
        _unmake(made)
        if full:
            raise DiskFull(f"the exported model {out.name}", out.parent, after=AGAIN) from err
        if isinstance(err, OSError):
            raise ExportError(f"--out {_shown(out)}: the export failed: {_reason(err)}; nothing half-written was "
                              "left") from err
        raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return policy, done


# ---- the destination ---------------------------------------------------------------------------------

def _claim(out: Path) -> tuple[Path, list[Path]]:
    """Check that `out` can be written, before any work: make the folders missing on the way to it, and try
    `out` and the temporary folder's name there. Returns the temporary folder and the folders made (which a
    failed export removes again); raises ExportError naming what cannot be used and why."""
    made: list[Path] = []
    try:
        if out.is_symlink():
            raise ExportError(f"--out {out} is a symbolic link (to {os.readlink(out)}); give a new folder")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"--out {out} already exists and is not an empty folder; give a new folder")
        for folder in reversed([out.parent, *out.parent.parents]):  # the root first
            if folder.is_dir():
                continue
            if folder.exists() or folder.is_symlink():
                raise ExportError(f"--out {_shown(out)}: {folder} is not a folder; give --out a new folder in a "
                                  "folder you can write to")
            folder.mkdir()
            made.append(folder)
        tmp = _temporary(out)
        for probe in ([] if out.exists() else [out]) + [tmp]:
            probe.mkdir()
            probe.rmdir()
    except OSError as err:
        _unmake(made)
        raise ExportError(f"--out {_shown(out)}: cannot create it: {_reason(err, out, creating=True)}; give --out a "
                          "new folder in a folder you can write to") from None
    except ExportError:
        _unmake(made)
        raise
    return tmp, made


def _temporary(out: Path) -> Path:
    """`.<name>.tmp-<pid>` next to `out`, its name cut to fit any filesystem's 255 bytes."""
    name = os.fsencode(out.name)[:200].decode(errors="ignore")
    return out.with_name(f".{name}.tmp-{os.getpid()}")


def _unmake(made: list[Path]) -> None:
    """Remove the folders `_claim` made for `--out`, the deepest first, while they are empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _reason(err: OSError, out: Path | None = None, *, creating: bool = False) -> str:
    """What an OSError met by the export means, in words, naming the path it concerns (`out` when it names
    none); `creating`: it came from making a folder for `--out`."""
    where = Path(err.filename) if err.filename else out
    parent = where.parent if where is not None else None
    code = err.errno
    if code == errno.ENAMETOOLONG and where is not None:
        limit = _name_max(where)
        for part in where.parts:
            if len(os.fsencode(part)) > limit:
                size = len(os.fsencode(part))
                return f"the name {_shown(part, 40)} is {size} bytes, over the {limit} its filesystem allows"
        return f"the path is {len(os.fsencode(str(where)))} bytes, longer than this system allows"
    if code in (errno.EACCES, errno.EPERM):
        return (f"no permission to write in {parent} ({err.strerror})" if creating
                else f"permission denied for {_shown(where)} ({err.strerror})")
    if code == errno.EROFS:
        return f"{parent} is on a read-only filesystem"
    if code == errno.ENOTDIR:
        return f"a part of {_shown(where)} is not a folder"
    if code == errno.ENOENT and parent is not None and parent.is_dir():  # /proc, /sys: no new folders there
        return f"{parent} does not take new files or folders ({err.strerror})"
    return f"{err.strerror or err} ({_shown(where)})" if where is not None else str(err)


def _name_max(path: Path) -> int:
    """The longest file name, in bytes, the filesystem of `path`'s nearest existing folder allows."""
    for folder in [path, *path.parents]:
        try:
            if folder.is_dir():
                return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def _shown(path: str | Path, width: int = 120) -> str:
    """A path for a one-line message: cut in the middle past `width` characters."""
    text = str(path)
    return text if len(text) <= width else f"{text[:width // 2]}...{text[-width // 4:]} ({len(text)} characters)"


# ---- the source ----------------------------------------------------------------------------------------

def _resolve(source: Path) -> tuple[Path, Path | None, bool]:
    """(the policy folder `source` stands for, the checkpoint folder holding it or None, whether `source` is a
    run whose newest checkpoint can be looked up again)."""
    from gradus.train.bootstrap import resolve_model_dir

    try:
        policy, _ = resolve_model_dir(source, label="export")
    except ConfigError as err:
        raise ExportError(str(err)) from None
    in_checkpoint = (policy.name == "policy" and re.fullmatch(r"step-\d+", policy.parent.name)
                     and policy.parent.parent.name == checkpoint_dir(Path()).name)
    ckpt = policy.parent if in_checkpoint else None
    return policy, ckpt, ckpt is not None and policy not in (source, source / "policy")


def _copy_policy(source: Path, first: tuple[Path, Path | None, bool], tmp: Path,
                 say: Callable[[str], None]) -> tuple[Path, bool]:
    """Copy the policy `source` stands for (`first`: `_resolve(source)`, made already) to `tmp`, from a folder
    that stayed the same for the whole copy (see the module doc, 2). Returns (the policy folder read, whether
    it is a LoRA adapter)."""
    for attempt in range(READS):
        policy, ckpt, again = first if attempt == 0 else _resolve(source)
        held = ckpt or policy
        before = _identity(held)
        try:
            is_adapter = _check_source(source, policy)
            shutil.copytree(policy, tmp)
        except (OSError, ExportError):
            if before is not None and _identity(held) == before:
                raise  # the folder stayed: the failure is its own (or the destination's), not a prune
        else:
            if before is not None and _identity(held) == before:
                return policy, is_adapter
        shutil.rmtree(tmp, ignore_errors=True)
        if not again:
            raise ExportError(f"{held} was removed while it was read: its run is still training and prunes old "
                              "checkpoints (run.keep_checkpoints); give the run folder to export its newest one")
        say(f"gradus: checkpoint {held} was removed by its run (still training) while it was read; reading the "
            "run's newest complete checkpoint again")
    raise ExportError(f"{source}: its newest checkpoint was removed while it was read, {READS} times in a row (the "
                      "run saves faster than one can be read); export after the run ends, or from a run with a "
                      "larger run.keep_checkpoints")


def _check_source(source: Path, policy: Path) -> bool:
    """Whether `policy` is a LoRA adapter folder; ExportError when it is no policy at all."""
    try:
        if lora.adapter_base(policy) is not None:
            lora.check_adapter_dir(policy)
            return True
        check_model_dir(policy)
        return False
    except ModelLoadError as err:
        raise ExportError(f"{source} holds no policy to export: {err}") from None


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of `folder`, or None when it is gone."""
    try:
        stat = os.stat(folder)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
