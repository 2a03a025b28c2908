"""Reading a user's folder of images: class folders found, files scanned (each real folder
once), what is left out named, and val split off seeded and stratified with byte-identical
copies kept together. The layouts (`finetune.data.layouts`) and predict.py build on these.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.data.duplicates import file_digests, originals
from finetune.data.loading import DatasetSplits, Sample, stratified_split
from finetune.errors import DataUnavailableError

log = logging.getLogger(__name__)


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


def report_left_out(folder: Path, class_names: list[str]) -> None:
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


def report_classes_without_val(class_names: list[str], val: list[Sample]) -> None:
    """Log the classes that a split of too few images leaves without a val image."""
    missing = sorted(set(class_names) - {class_names[label] for _, label in val})
    if missing:
        log.warning(
            "Class(es) %s have too few images to keep one for val: they train, but their val "
            "accuracy is not measured (val/acc_per_class is null). Fix: add images of them.",
            ", ".join(missing),
        )


def folder_samples(folder: Path, class_names: list[str]) -> list[Sample]:
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


def class_folders(folder: Path) -> list[str]:
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


SPLIT_FOLDERS = ("train", "val", "test")


def two_or_more(folder: Path, class_names: list[str]) -> list[str]:
    """`class_names` as they are; raises `DataUnavailableError` for a single class folder, the
    usual sign of a data.root one level too high (its one "class" holds train/ and val/), and
    for "classes" that are datasets (class folders holding train/ or val/ of their own)."""
    if len(class_names) >= 2:
        datasets = [
            name
            for name in class_names
            if any((folder / name / split).is_dir() for split in SPLIT_FOLDERS)
        ]
        if datasets:
            raise DataUnavailableError(
                f"The class folder(s) {', '.join(datasets)} of {folder} hold train/ or val/ "
                "folders of their own: they look like datasets, not classes, so data.root is "
                f"one level too high. Fix: data.root={folder / datasets[0]}."
            )
        if all(_holds_class_folders(folder / name) for name in class_names):
            # Images in sub-folders of a class are that class's (as torchvision's ImageFolder
            # reads them), so this is said, not refused.
            log.warning(
                "Every class folder of %s (%s) holds no image of its own but two or more "
                "folders of images: they look like sets of classes, and each is trained as one "
                "class. If the classes are one level down, data.root=%s.",
                folder,
                ", ".join(class_names[:5]) + (", ..." if len(class_names) > 5 else ""),
                folder / class_names[0],
            )
        return class_names
    only = folder / class_names[0]
    nested = [name for name in ("train", "val") if (only / name).is_dir()]
    if nested:
        fix = f"Fix: data.root={only} (it holds {' and '.join(f'{n}/' for n in nested)})."
    elif _holds_class_folders(only):  # root/photos/{ants,bees}: the classes are one level down
        fix = f"{only} holds class folders of its own: data.root is one level too high. Fix: data.root={only}."
    else:
        fix = f"Fix: add a sub-folder of images for each other class beside {only}."
    raise DataUnavailableError(
        f"Only one class folder in {folder} ({class_names[0]}): a classifier needs two or "
        f"more. {fix}"
    )


def _holds_class_folders(folder: Path) -> bool:
    """Whether `folder` holds no image file itself and two or more folders that do."""
    entries = list(folder.iterdir())
    if any(entry.is_file() and is_image_file(entry) for entry in entries):
        return False
    with_images = [
        entry
        for entry in entries
        if entry.is_dir() and any(is_image_file(p) for p in entry.iterdir() if p.is_file())
    ]
    return len(with_images) >= 2


def split_folders(root: Path, val_fraction: float, seed: int) -> DatasetSplits:
    """`root/train`, `root/val`, optional `root/test`; without `val/`, val is split from train."""
    class_names = two_or_more(root / "train", class_folders(root / "train"))
    train = folder_samples(root / "train", class_names)
    report_left_out(root / "train", class_names)
    splits = {"val": None, "test": None}
    for split in splits:
        if not (root / split).is_dir():
            continue
        unknown = sorted(set(class_folders(root / split)) - set(class_names))
        if unknown:
            raise DataUnavailableError(
                f"{root / split} has class folders that train/ lacks: {', '.join(unknown)}. "
                f"Fix: add training images for them under {root / 'train'}, or remove them."
            )
        splits[split] = folder_samples(root / split, class_names)
    val_from = f"the folders train/ and val/ under {root}"
    if splits["val"] is None:
        train, splits["val"] = split_off_val(train, class_names, val_fraction, seed)
        val_from = auto_split(val_fraction, seed)
    found = DatasetSplits(class_names, train, splits["val"], splits["test"], val_from)
    return require_images(found, root)


def auto_split(val_fraction: float, seed: int) -> str:
    """How `split_off_val` makes val, in words (split.json's `val_split`)."""
    return (
        f"a stratified share data.val_fraction={val_fraction} of each class, data.split_seed={seed}"
    )


def split_off_val(
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
    report_classes_without_val(class_names, val)
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
