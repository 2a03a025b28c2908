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

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(handle)` on a binary file beside `path`, then rename it over `path`.

    The partial file's name holds the process id, so two processes writing the same target never
    write into one file: the last rename wins, and each rename installs a complete file. Raises
    `OSError` as the file system reports it (the partial file is removed first).
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            write(handle)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    """`payload` as indented, key-sorted JSON (a trailing newline), written atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))
