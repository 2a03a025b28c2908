"""Byte-identical image files: found by content digest, kept on one side of an automatic split,
and named when given splits share them (a val image that also trains inflates val accuracy).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from finetune.data.loading import DatasetSplits


def file_digest(path: str) -> str:
    """The SHA-1 hex digest of the bytes of the file at `path`; for a file that cannot be read,
    a mark that equals no other file's (verification names such files)."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha1").hexdigest()
    except OSError as error:
        return f"unreadable {path}: {error.strerror}"


def file_digests(paths: Iterable[str], threads: int | None = None) -> dict[str, str]:
    """Path -> `file_digest`, read in `threads` threads (default: one per core)."""
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=max(threads or os.cpu_count() or 1, 1)) as pool:
        return dict(zip(paths, pool.map(file_digest, paths), strict=True))


def originals(digests: Mapping[str, str]) -> dict[str, str]:
    """Path -> the first path (in `digests`' order) with the same bytes, for each copy; a file
    without a twin, and the first of each group, are not keys."""
    first: dict[str, str] = {}
    copies = {}
    for path, digest in digests.items():
        if digest in first:
            copies[path] = first[digest]
        else:
            first[digest] = path
    return copies


def across_splits(splits: DatasetSplits, digests: Mapping[str, str]) -> list[dict[str, list[str]]]:
    """The groups of byte-identical files that lie in more than one split: for each, split ->
    its paths there (splits in train, val, test order; groups by their first path)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for split, samples in splits.named().items():
        for path, _label in samples:
            groups.setdefault(digests[path], {}).setdefault(split, []).append(path)
    shared = [group for group in groups.values() if len(group) > 1]
    return sorted(shared, key=lambda group: next(iter(group.values()))[0])
