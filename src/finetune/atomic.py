"""Writing files so that no reader, and no kill, ever sees half of one.

Every file this project writes that something later trusts (run dir json files, checkpoints, the
feature cache, the record of verified images) goes through `atomic_write`: the content is written
beside the target under a name unique to this process, then renamed over it, which POSIX makes
atomic. A crash, a kill or a full disk mid-write leaves the previous file (or none), never a
truncated one. There is no fsync: a killed process is the failure guarded against, and the
written data is already in the OS's cache (flushing every epoch's checkpoint to disk would cost
more than a cached linear probe's whole training).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from finetune.errors import FinetuneError

# Less free space than this after a failed write: the disk was full. torch.save's zip writer
# reports a full disk as RuntimeError("... unexpected pos ..."), without an errno.
FULL_DISK_BYTES = 1 << 20


class DiskFullError(FinetuneError):
    """A write failed because the file system holding the target is full. `path`: the target;
    the files written before it are intact (see `atomic_write`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"Could not write {path}: the disk is full (the file system of {path.parent}). "
            "Everything written before is intact; the partial file was removed. Fix: free "
            "space there (or write elsewhere: hydra.run.dir, paths.cache_dir, output=...), "
            "then run the command again."
        )


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of `folder`; None when it cannot be asked."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(handle)` on a binary file beside `path`, then rename it over `path`.

    The partial file's name holds the process id, so two processes writing the same target never
    write into one file: the last rename wins, and each rename installs a complete file. Raises
    `DiskFullError` when the disk is full (whatever the writer raised: ENOSPC, or torch's zip
    writer's RuntimeError) and otherwise `OSError` as the file system reports it; the partial
    file is removed first.
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            write(handle)
        os.replace(partial, path)
    except BaseException as error:
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if not full and isinstance(error, OSError | RuntimeError) and partial.exists():
            free = _free_bytes(partial.parent)  # before the partial file's space is returned
            full = free is not None and free < FULL_DISK_BYTES
        partial.unlink(missing_ok=True)
        if full:
            raise DiskFullError(path) from error
        raise
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    """`payload` as indented, key-sorted JSON (a trailing newline), written atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))
