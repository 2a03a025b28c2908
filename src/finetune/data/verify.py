"""Finding unreadable image files before training, once per exact file list.

Every image is decoded with `load_rgb` (what training does) before the first epoch, so a
corrupt file stops the run at once with all bad files named, not hours in. The result is
remembered in `<cache_dir>/verified/<fingerprint>.json`, keyed by the exact files (path, size,
modification time): an unchanged dataset is not decoded twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finetune.atomic import write_json
from finetune.data.duplicates import file_digests
from finetune.data.folders import require_images
from finetune.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLarge,
    load_rgb,
    pixel_limit,
)
from finetune.data.loading import DatasetSplits, Sample
from finetune.errors import DataUnavailableError
from finetune.progress import progress

log = logging.getLogger(__name__)

TOO_LARGE = ImageTooLarge.__name__  # how a reason of `find_unreadable` starts for such a file


def files_fingerprint(samples: list[Sample]) -> str:
    """The exact file list, in order, with each file's size and modification time (sha256
    hex digest)."""
    digest = hashlib.sha256()
    for path, _label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def find_unreadable(paths: list[str], threads: int) -> dict[str, str]:
    """Files that do not decode completely (truncated, corrupt, not an image), with the reason."""

    def problem(path: str) -> str | None:
        try:
            load_rgb(path)  # the whole file: truncation only shows when decoding
            return None
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
            return f"{type(error).__name__}: {error}"

    problems = {}
    with (
        ThreadPoolExecutor(max_workers=max(threads, 1)) as pool,
        progress("Verifying that every image decodes", len(paths), "images") as advance,
    ):
        for path, reason in zip(paths, pool.map(problem, paths), strict=True):
            problems[path] = reason
            advance(1)
    return {path: reason for path, reason in problems.items() if reason}


def _recorded(kind: str, samples: list[Sample], cache_dir: Path, compute) -> dict[str, str]:
    """`compute(paths)` of the files of `samples`, read from `<cache_dir>/<kind>/` when this
    exact file list was recorded there, else computed and recorded (atomically)."""
    record = cache_dir / kind / f"{files_fingerprint(samples)}.json"
    if record.is_file():
        return json.loads(record.read_text())
    result = compute([path for path, _ in samples])
    with contextlib.suppress(OSError):  # a read-only cache: compute again next time
        write_json(record, result)
    return result


def unreadable_files(splits: DatasetSplits, cache_dir: Path) -> dict[str, str]:
    """Unreadable files of every split (path -> reason), read from the verified record of this
    exact file list (at this pixel limit) or found by decoding every image and then recorded."""
    every = [s for samples in splits.named().values() for s in samples]
    threads = os.cpu_count() or 1
    limit = pixel_limit()
    kind = "verified" if limit == DEFAULT_MAX_IMAGE_PIXELS else f"verified/max-pixels-{limit}"
    return _recorded(kind, every, cache_dir, lambda paths: find_unreadable(paths, threads))


def content_digests(splits: DatasetSplits, cache_dir: Path) -> dict[str, str]:
    """Path -> SHA-1 of its bytes for every file of every split, recorded like the
    verification (`duplicates.file_digests`)."""
    every = [s for samples in splits.named().values() for s in samples]
    return _recorded("digests", every, cache_dir, file_digests)


def without_unreadable(
    splits: DatasetSplits, cache_dir: Path, skip_corrupt: bool, dataset: str, root: Path
) -> tuple[DatasetSplits, dict[str, str]]:
    """`splits` and the unreadable files left out of them (path -> reason).

    Raises `DataUnavailableError` naming every unreadable file unless `skip_corrupt`, and when
    skipping them leaves a split of `dataset` under `root` empty."""
    unreadable = unreadable_files(splits, cache_dir)
    if not unreadable:
        return splits, {}
    listing = "\n".join(f"  {path} ({reason})" for path, reason in sorted(unreadable.items()))
    too_large = [path for path, reason in unreadable.items() if reason.startswith(TOO_LARGE)]
    if too_large:
        raise DataUnavailableError(
            f"{len(too_large)} image file(s) of dataset {dataset} are larger than the pixel "
            f"limit ({pixel_limit()} pixels): they are valid images, not corrupt ones. Fix: "
            "data.max_image_pixels=N above their size, or data.max_image_pixels=null for no "
            f"limit (large JPEGs then decode at a reduced size).\n{listing}"
        )
    if not skip_corrupt:
        raise DataUnavailableError(
            f"{len(unreadable)} image file(s) of dataset {dataset} cannot be read:\n"
            f"{listing}\nFix: remove or replace them, or set data.skip_corrupt=true to train "
            "without them (the run lists them in skipped_images.json)."
        )
    log.warning("Skipping %d unreadable image file(s):\n%s", len(unreadable), listing)

    def keep(samples: list[Sample] | None) -> list[Sample] | None:
        return None if samples is None else [s for s in samples if s[0] not in unreadable]

    kept = dataclasses.replace(
        splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test)
    )
    return require_images(kept, root), dict(unreadable)
