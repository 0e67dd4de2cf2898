"""Writing files that survive a kill or a power cut, and telling a full disk apart from other errors.

A file is durable once its data and the folder entry naming it are on disk: `fsync` the file, then
its folder. A rename is atomic, but without those `fsync`s a crash soon after it can leave the new
name pointing at empty or partial data. A full disk shows up as `OSError(ENOSPC)`, or, from
torch's zip writer, as a `RuntimeError` ("inline_container.cc: unexpected pos") that hides the
errno; `is_disk_full` recognises both.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# Below this much free space after a failed write, the failure is taken to be a full disk.
LOW_SPACE_BYTES = 64 * 2**20
_FULL = (errno.ENOSPC, errno.EDQUOT)


RESUME = "Everything saved before it is intact: free some space, then resume the run"


class DiskFull(OSError):
    """A write failed because the disk (or the user's quota) is full. `after`: what is left and what to do
    (a run is resumed; a command that is not a run, such as `gradus export`, is run again)."""

    def __init__(self, what: str, where: Path, after: str = RESUME):
        super().__init__(f"disk full while writing {what} in {where} ({_free(where)} free). {after}")
        self.errno = errno.ENOSPC
        self.run_dir: Path | None = None  # set by the trainer, for the resume hint


def is_disk_full(err: BaseException, where: Path) -> bool:
    """Whether `err` (or an error it wraps) means the disk is full. Only an error that names no cause of its own
    (torch's zip writer) is judged by the free space of `where`: an errno that is not ENOSPC (no such folder,
    permission denied) is that failure, whatever the space; and a filesystem of size 0 (/proc, /sys, which
    report 0 bytes free) holds no data to fill up."""
    seen: BaseException | None = err
    said = False  # some error of the chain carries an errno: the system said what failed
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        if "No space left" in str(seen):
            return True
        said = said or (isinstance(seen, OSError) and seen.errno is not None)
        seen = seen.__cause__ or seen.__context__
    if said:
        return False
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return False
    return usage.total > 0 and usage.free < LOW_SPACE_BYTES


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (new names, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform where folders cannot be opened (Windows): nothing to do
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems cannot sync a folder
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file under `root`, then every folder bottom-up; return {relative path: size in bytes}."""
    sizes: dict[str, int] = {}
    for folder, _, names in os.walk(root, topdown=False):
        for name in sorted(names):
            path = Path(folder) / name
            fsync_file(path)
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
        fsync_dir(Path(folder))
    return sizes


def write_text_synced(path: Path, text: str) -> None:
    """Write `path` and fsync it (the caller renames or fsyncs the folder)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_text(path: Path, text: str, *, what: str | None = None) -> None:
    """Replace `path` by `text` atomically: a kill leaves the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_text_synced(tmp, text)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err, path.parent):
            raise DiskFull(what or path.name, path.parent) from err
        raise
    fsync_dir(path.parent)


def _free(where: Path) -> str:
    try:
        return f"{shutil.disk_usage(where).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"
