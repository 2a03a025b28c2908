"""The dataset layouts, each a pair of functions: `fetch` puts the files in place
(downloads or generates them when absent; nothing to do for a user's folder) and `build` lists
them as a `DatasetSplits` without touching the network or writing anything.

Layouts, all under `data.root` (the parent folder holding each dataset under its canonical name):
- hymenoptera: `<root>/hymenoptera_data/{train,val}/<class>/*.jpg`, downloaded when absent.
- flowers102:  `<root>/flowers-102/{jpg/, imagelabels.mat, setid.mat}` (torchvision's layout),
  official splits train 1020 / val 1020 / test 6149, downloaded when absent.
- imagefolder: `<root>` itself is the user's folder: either `train/ val/ [test/]` with class
  folders inside, or class folders directly, split by a seeded stratified `val_fraction`.
- csv:         `<root>/<data.labels.file>`: a CSV/TSV of image paths and labels (and splits).
- synthetic:   `<root>/synthetic/{train,val,test}/<class>/*.png`, generated on first use.

A new layout is a `fetch` and a `build` function added to `LAYOUTS`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from finetune.data.folders import (
    auto_split,
    class_folders,
    folder_samples,
    report_left_out,
    require_images,
    split_folders,
    split_off_val,
    two_or_more,
)
from finetune.data.label_files import build_from_labels_file
from finetune.data.loading import DatasetSplits
from finetune.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from finetune.errors import DataUnavailableError, unknown_name

log = logging.getLogger(__name__)

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


@dataclass(frozen=True)
class LayoutOptions:
    """What the layouts read from the data config: `root` (the data root, or the user's folder
    for imagefolder), whether to `download` missing datasets, imagefolder's `val_fraction` and
    `split_seed`, the `synthetic` recipe and the csv layout's `labels` file."""

    root: Path
    download: bool
    val_fraction: float
    split_seed: int
    synthetic: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, Any] = field(default_factory=dict)  # the labels file and its columns


@contextlib.contextmanager
def removed_on_failure(folder: Path) -> Iterator[None]:
    """Run the block; if it raises, remove the folders it created on the way to `folder` (the
    topmost one that did not exist before). A failed download must not leave an empty data root
    behind: the next run would then report an empty folder instead of a missing one."""
    missing = next((p for p in (*reversed(folder.parents), folder) if not p.exists()), None)
    try:
        yield
    except BaseException:
        if missing is not None:
            shutil.rmtree(missing, ignore_errors=True)
        raise


def _download_archive(url: str, root: Path, name: str, expected: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    log.info("Downloading %s from %s into %s", name, url, root)
    archive = root / url.rsplit("/", 1)[-1]
    try:
        with removed_on_failure(expected):
            root.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(url, download_root=str(root))
    except Exception as error:  # network errors come as URLError, HTTPError, OSError...
        archive.unlink(missing_ok=True)  # never leave a partial zip that looks complete
        raise DataUnavailableError(
            f"Dataset {name} is not in {expected} and downloading {url} failed ({error}). "
            f"Fix: download and unzip it into {root} by hand, or point paths.data_root (or "
            f"data.root) at the folder that contains {expected.name}/."
        ) from error


# ------------------------------------------------------------------------------------------
# The layouts: fetch (files in place) and build (LayoutOptions -> DatasetSplits)
# ------------------------------------------------------------------------------------------


def fetch_hymenoptera(options: LayoutOptions) -> None:
    folder = options.root / "hymenoptera_data"
    if not (folder / "train").is_dir() and options.download:
        _download_archive(HYMENOPTERA_URL, options.root, "hymenoptera", folder)


def _require_root(options: LayoutOptions, dataset: str) -> None:
    if not options.root.is_dir():
        raise DataUnavailableError(
            f"The data root {options.root} does not exist, so dataset {dataset} is not there. "
            "Fix: set data.root (or paths.data_root) to the folder that holds the datasets, or "
            "let the run download it (data.download=true) where the internet is reachable."
        )


def build_hymenoptera(options: LayoutOptions) -> DatasetSplits:
    folder = options.root / "hymenoptera_data"
    _require_root(options, "hymenoptera")
    if not (folder / "train").is_dir():
        raise DataUnavailableError(
            f"Dataset hymenoptera not found: {folder} has no train/ folder. Fix: unzip "
            f"hymenoptera_data.zip ({HYMENOPTERA_URL}) into {options.root}, or point "
            "paths.data_root (or data.root) at the folder that contains hymenoptera_data/."
        )
    return split_folders(folder, val_fraction=0.2, seed=0)


def _flowers102(options: LayoutOptions, split: str, download: bool):
    """torchvision's Flowers102 of one split; a clear error when its files are not there."""
    from torchvision.datasets import Flowers102

    folder = options.root / "flowers-102"
    try:
        with removed_on_failure(folder):
            return Flowers102(str(options.root), split=split, download=download)
    except (RuntimeError, OSError) as error:  # torchvision: missing files or failed download
        raise DataUnavailableError(
            f"Dataset flowers102 not found or incomplete in {folder} (expected jpg/, "
            f"imagelabels.mat and setid.mat) and could not be downloaded ({error}). Fix: "
            f"place those files in {folder}, or point paths.data_root (or data.root) at the "
            "folder that contains flowers-102/."
        ) from error


def fetch_flowers102(options: LayoutOptions) -> None:
    if options.download:  # torchvision downloads only what its integrity check finds missing
        _flowers102(options, "train", download=True)


def build_flowers102(options: LayoutOptions) -> DatasetSplits:
    _require_root(options, "flowers102")
    splits = {}
    for split in ("train", "val", "test"):
        dataset = _flowers102(options, split, download=False)
        # torchvision keeps the official split's files and labels in these attributes.
        splits[split] = [
            (str(p), int(y)) for p, y in zip(dataset._image_files, dataset._labels, strict=False)
        ]
    test = splits.pop("test")
    if test and not any(Path(p).is_file() for p, _ in test):
        # A copy without the official test images (held out for evaluation elsewhere) still
        # trains and validates; its runs report no test accuracy.
        log.warning(
            "Flowers102's %d test images are not in %s: the run has no test split.",
            len(test),
            options.root / "flowers-102" / "jpg",
        )
        test = None
    for split, samples in [*splits.items(), ("test", test or [])]:
        missing = [p for p, _ in samples if not Path(p).is_file()]
        if missing:
            raise DataUnavailableError(
                f"{len(missing)} of the {len(samples)} Flowers102 {split} images are missing in "
                f"{options.root / 'flowers-102' / 'jpg'} (first missing: {missing[0]}). Fix: "
                "extract 102flowers.tgz there."
            )
    classes = list(type(dataset).classes)
    return DatasetSplits(
        classes, splits["train"], splits["val"], test, "the official splits (setid.mat)"
    )


def fetch_nothing(options: LayoutOptions) -> None:
    """A user's own folder is never downloaded or generated."""


def build_imagefolder(options: LayoutOptions) -> DatasetSplits:
    root = options.root
    if not root.is_dir():
        raise DataUnavailableError(
            f"Image folder {root} does not exist. Fix: set data.root to a folder holding "
            "train/ and val/ (each with one sub-folder per class), or class folders directly."
        )
    if (root / "train").is_dir():
        return split_folders(root, options.val_fraction, options.split_seed)
    class_names = two_or_more(root, class_folders(root))
    samples = folder_samples(root, class_names)
    report_left_out(root, class_names)
    train, val = split_off_val(samples, class_names, options.val_fraction, options.split_seed)
    val_from = auto_split(options.val_fraction, options.split_seed)
    return require_images(DatasetSplits(class_names, train, val, None, val_from), root)


def build_csv(options: LayoutOptions) -> DatasetSplits:
    """The images and labels that `data.labels.file` (in `data.root`) lists."""
    return build_from_labels_file(
        options.root, options.labels, options.val_fraction, options.split_seed
    )


def _synthetic_recipe(options: LayoutOptions) -> dict[str, Any]:
    return {"classes": list(SYNTHETIC_CLASSES), **dict(options.synthetic)}


def fetch_synthetic(options: LayoutOptions) -> None:
    """Generate (once) a small, visually separable image set so everything runs offline; a
    changed recipe regenerates it."""
    folder = options.root / "synthetic"
    recipe = _synthetic_recipe(options)
    marker = folder / "recipe.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
        generate_synthetic(folder, recipe)


def build_synthetic(options: LayoutOptions) -> DatasetSplits:
    return split_folders(options.root / "synthetic", val_fraction=0.2, seed=0)


def split_listing(splits: DatasetSplits, root: Path) -> dict[str, dict[str, list[str]]]:
    """Which files each split holds: split -> class name -> paths in the splits' order,
    relative to `root` where they lie under it (what split.json in the run dir records)."""
    listing: dict[str, dict[str, list[str]]] = {}
    for split, samples in splits.named().items():
        by_class: dict[str, list[str]] = {name: [] for name in splits.class_names}
        for path, label in samples:
            relative = Path(path)
            with contextlib.suppress(ValueError):
                relative = relative.relative_to(root)
            by_class[splits.class_names[label]].append(relative.as_posix())
        listing[split] = by_class
    return listing


class Layout(NamedTuple):
    fetch: Callable[[LayoutOptions], None]
    build: Callable[[LayoutOptions], DatasetSplits]


LAYOUTS: dict[str, Layout] = {
    "hymenoptera": Layout(fetch_hymenoptera, build_hymenoptera),
    "flowers102": Layout(fetch_flowers102, build_flowers102),
    "imagefolder": Layout(fetch_nothing, build_imagefolder),
    "csv": Layout(fetch_nothing, build_csv),
    "synthetic": Layout(fetch_synthetic, build_synthetic),
}


def layout(dataset: str) -> Layout:
    """The layout named `dataset`; raises `FinetuneError` listing the known ones."""
    if dataset not in LAYOUTS:
        raise unknown_name("dataset", dataset, list(LAYOUTS))
    return LAYOUTS[dataset]
