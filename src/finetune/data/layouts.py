"""The four dataset layouts, each a pair of functions: `fetch` puts the files in place
(downloads or generates them when absent; nothing to do for a user's folder) and `build` lists
them as a `DatasetSplits` without touching the network or writing anything.

Layouts, all under `data.root` (the parent folder holding each dataset under its canonical name):
- hymenoptera: `<root>/hymenoptera_data/{train,val}/<class>/*.jpg`, downloaded when absent.
- flowers102:  `<root>/flowers-102/{jpg/, imagelabels.mat, setid.mat}` (torchvision's layout),
  official splits train 1020 / val 1020 / test 6149, downloaded when absent.
- imagefolder: `<root>` itself is the user's folder: either `train/ val/ [test/]` with class
  folders inside, or class folders directly, split by a seeded stratified `val_fraction`.
- synthetic:   `<root>/synthetic/{train,val,test}/<class>/*.png`, generated on first use.

A new layout is a `fetch` and a `build` function added to `LAYOUTS`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.data.duplicates import file_digests, originals
from finetune.data.loading import DatasetSplits, Sample, stratified_split
from finetune.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from finetune.errors import DataUnavailableError, unknown_name

log = logging.getLogger(__name__)

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


@dataclass(frozen=True)
class LayoutOptions:
    """What the layouts read from the data config: `root` (the data root, or the user's folder
    for imagefolder), whether to `download` missing datasets, imagefolder's `val_fraction` and
    `split_seed`, and the `synthetic` recipe."""

    root: Path
    download: bool
    val_fraction: float
    split_seed: int
    synthetic: Mapping[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Folder helpers
# ------------------------------------------------------------------------------------------


def is_image_file(path: Path, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> bool:
    """An image by extension (one of `extensions`, any case), and not hidden: macOS
    `._name.jpg` resource forks, `.DS_Store` and files in hidden folders such as
    `.ipynb_checkpoints` are not images of the class."""
    return path.suffix.lower() in extensions and not path.name.startswith(".")


def files_under(folder: Path) -> tuple[list[Path], list[str]]:
    """Every file under `folder`, recursively (symlinks followed), sorted per folder, hidden
    folders skipped; and the linked folders left out. A linked folder is entered once: one that
    leads back to `folder` or a folder above it (a loop, such as `dogs/everything -> ..`) or to
    a folder already scanned is left out, so no file is counted twice or under another class."""
    found: list[Path] = []
    top = os.path.realpath(folder)
    scanned = {top}
    left_out: list[str] = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in subdirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(directory, name))
            if real in scanned or top.startswith(real + os.sep):
                left_out.append(os.path.join(directory, name))
            else:
                scanned.add(real)
                kept.append(name)
        subdirs[:] = kept
        found += [Path(directory) / f for f in sorted(files)]
    return found, left_out


def images_under(folder: Path, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[Path]:
    """The image files under `folder` (`files_under`: recursively, symlinks followed, each real
    folder once). [] when `folder` does not exist. Training's folder scan and predict.py share
    this rule; linked folders left out are named in a warning."""
    found, left_out = files_under(folder)
    if left_out:
        log.warning(
            "Left out %d linked folder(s) under %s that lead back to a folder already scanned "
            "(a symlink loop, or a second link to one folder): %s. Fix: remove the link(s).",
            len(left_out),
            folder,
            ", ".join(left_out[:3]),
        )
    return [path for path in found if is_image_file(path, extensions)]


# Image types the loader does not read (torchvision's ImageFolder leaves them out too): named
# when a class folder holds some, not skipped in silence.
UNREAD_IMAGE_TYPES = (".gif", ".heic", ".heif", ".avif", ".jfif", ".jxl", ".svg")


def _report_left_out(folder: Path, class_names: list[str]) -> None:
    """Log what a scan of `folder`'s class folders leaves out: images lying directly in
    `folder` (no class) and files of an image type the loader does not read."""
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if loose:
        log.warning(
            "%d image(s) directly in %s belong to no class folder and are left out (e.g. %s). "
            "Fix: move them into the folder of their class.",
            len(loose),
            folder,
            ", ".join(loose[:3]),
        )
    report_unread(folder, [folder / name for name in class_names])


def report_unread(
    folder: Path, scanned: list[Path], extensions: tuple[str, ...] = IMG_EXTENSIONS
) -> None:
    """Log the files under the `scanned` folders (recursively) of an image type that is not
    among `extensions` (`UNREAD_IMAGE_TYPES`: .gif, .heic ...), named relative to `folder`:
    left out, not skipped in silence."""
    unread = [
        path
        for top in scanned
        for path in files_under(top)[0]
        if path.suffix.lower() in UNREAD_IMAGE_TYPES
        and not is_image_file(path, extensions)
        and not path.name.startswith(".")
    ]
    if unread:
        log.warning(
            "Left out %d file(s) of an image type the loader does not read (it reads %s), "
            "e.g. %s. Fix: convert them to .jpg or .png.",
            len(unread),
            ", ".join(extensions),
            ", ".join(str(p.relative_to(folder)) for p in unread[:3]),
        )


def _report_classes_without_val(class_names: list[str], val: list[Sample]) -> None:
    """Log the classes that a split of too few images leaves without a val image."""
    missing = sorted(set(class_names) - {class_names[label] for _, label in val})
    if missing:
        log.warning(
            "Class(es) %s have too few images to keep one for val: they train, but their val "
            "accuracy is not measured (val/acc_per_class is null). Fix: add images of them.",
            ", ".join(missing),
        )


def _folder_samples(folder: Path, class_names: list[str]) -> list[Sample]:
    """Image files under `folder/<class>/` (recursively), labelled by position in
    `class_names`. A class folder without images is an error naming that folder."""
    samples: list[Sample] = []
    for label, class_name in enumerate(class_names):
        class_dir = folder / class_name
        found = images_under(class_dir)
        if not found:
            present = class_dir.is_dir()
            raise DataUnavailableError(
                f"Class '{class_name}' has no images in {folder}: "
                + (f"{class_dir} holds no image files" if present else f"{class_dir} is missing")
                + f" (looked for {', '.join(IMG_EXTENSIONS)}). Fix: add images of '{class_name}'"
                " there, or remove the class from every split."
            )
        samples += [(str(path), label) for path in found]
    return samples


def _class_folders(folder: Path) -> list[str]:
    """Sub-folders of `folder` in sorted order; hidden ones (`.cache`, `.ipynb_checkpoints`) are
    not classes."""
    if not folder.is_dir():
        raise DataUnavailableError(
            f"Folder {folder} does not exist. Fix: check data.root (it should hold one "
            "sub-folder of images per class, or train/ and val/ folders with those)."
        )
    class_names = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not class_names:
        raise DataUnavailableError(
            f"No class folders in {folder}: expected one sub-folder of images per class."
        )
    return class_names


def _two_or_more(folder: Path, class_names: list[str]) -> list[str]:
    """`class_names` as they are; raises `DataUnavailableError` for a single class folder, the
    usual sign of a data.root one level too high (its one "class" holds train/ and val/)."""
    if len(class_names) >= 2:
        return class_names
    only = folder / class_names[0]
    nested = [name for name in ("train", "val") if (only / name).is_dir()]
    fix = (
        f"Fix: data.root={only} (it holds {' and '.join(f'{n}/' for n in nested)})."
        if nested
        else f"Fix: add a sub-folder of images for each other class beside {only}."
    )
    raise DataUnavailableError(
        f"Only one class folder in {folder} ({class_names[0]}): a classifier needs two or "
        f"more. {fix}"
    )


def _split_folders(root: Path, val_fraction: float, seed: int) -> DatasetSplits:
    """`root/train`, `root/val`, optional `root/test`; without `val/`, val is split from train."""
    class_names = _two_or_more(root / "train", _class_folders(root / "train"))
    train = _folder_samples(root / "train", class_names)
    _report_left_out(root / "train", class_names)
    splits = {"val": None, "test": None}
    for split in splits:
        if not (root / split).is_dir():
            continue
        unknown = sorted(set(_class_folders(root / split)) - set(class_names))
        if unknown:
            raise DataUnavailableError(
                f"{root / split} has class folders that train/ lacks: {', '.join(unknown)}. "
                f"Fix: add training images for them under {root / 'train'}, or remove them."
            )
        splits[split] = _folder_samples(root / split, class_names)
    if splits["val"] is None:
        train, splits["val"] = _split_off_val(train, class_names, val_fraction, seed)
    return require_images(DatasetSplits(class_names, train, splits["val"], splits["test"]), root)


def _split_off_val(
    samples: list[Sample], class_names: list[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """The seeded stratified train/val split of `samples`, byte-identical copies kept on the
    side of their original (an image both trained on and validated on inflates val)."""
    copies = originals(file_digests(path for path, _ in samples))
    train, val = stratified_split(samples, val_fraction, seed, copies)
    if copies:
        log.info(
            "%d file(s) are byte-identical copies of others (e.g. %s): each stays on the side "
            "of the split its original is on.",
            len(copies),
            ", ".join(Path(path).name for path in list(copies)[:3]),
        )
    _report_classes_without_val(class_names, val)
    return train, val


def require_images(splits: DatasetSplits, where: Path) -> DatasetSplits:
    """`splits` as they are; raises `DataUnavailableError` naming `where` when a split is
    empty."""
    for split_name, count in splits.sizes().items():
        if count == 0:
            raise DataUnavailableError(
                f"The {split_name} split under {where} holds no images "
                f"(looked for {', '.join(IMG_EXTENSIONS)} in its class folders)."
            )
    return splits


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
            f"Fix: download and unzip it into {root} by hand, or set data.root to the folder "
            f"that contains {expected.name}/."
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
            f"hymenoptera_data.zip ({HYMENOPTERA_URL}) into {options.root}, or set data.root to "
            "the folder that contains hymenoptera_data/."
        )
    return _split_folders(folder, val_fraction=0.2, seed=0)


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
            f"place those files in {folder}, or set data.root to the folder that contains "
            "flowers-102/."
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
    return DatasetSplits(classes, splits["train"], splits["val"], test)


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
        return _split_folders(root, options.val_fraction, options.split_seed)
    class_names = _two_or_more(root, _class_folders(root))
    samples = _folder_samples(root, class_names)
    _report_left_out(root, class_names)
    train, val = _split_off_val(samples, class_names, options.val_fraction, options.split_seed)
    return require_images(DatasetSplits(class_names, train, val), root)


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
    return _split_folders(options.root / "synthetic", val_fraction=0.2, seed=0)


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


def how_split(dataset: str, options: LayoutOptions) -> str:
    """How the val split was made, in words (for split.json)."""
    if dataset == "flowers102":
        return "the official splits (setid.mat)"
    folder = {"hymenoptera": "hymenoptera_data", "synthetic": "synthetic"}.get(dataset, "")
    if (options.root / folder / "val").is_dir():
        return f"the folders train/ and val/ under {options.root / folder}"
    return (
        f"a stratified share data.val_fraction={options.val_fraction} of each class, "
        f"data.split_seed={options.split_seed}"
    )


class Layout(NamedTuple):
    fetch: Callable[[LayoutOptions], None]
    build: Callable[[LayoutOptions], DatasetSplits]


LAYOUTS: dict[str, Layout] = {
    "hymenoptera": Layout(fetch_hymenoptera, build_hymenoptera),
    "flowers102": Layout(fetch_flowers102, build_flowers102),
    "imagefolder": Layout(fetch_nothing, build_imagefolder),
    "synthetic": Layout(fetch_synthetic, build_synthetic),
}


def layout(dataset: str) -> Layout:
    """The layout named `dataset`; raises `FinetuneError` listing the known ones."""
    if dataset not in LAYOUTS:
        raise unknown_name("dataset", dataset, list(LAYOUTS))
    return LAYOUTS[dataset]
