"""One LightningDataModule over four dataset layouts.

Every dataset builder returns the same thing, a `DatasetSplits`: the class names and, per split,
a list of `(image path, class index)` samples. The data module turns those lists into datasets
with the train or eval preset of the backbone's `InputSpec`. Keeping datasets as explicit sample
lists makes splits, subsets and caching easy to reason about and to test.

Layouts, all under `data.root` (the parent folder holding each dataset under its canonical name):
- hymenoptera: `<root>/hymenoptera_data/{train,val}/<class>/*.jpg`, downloaded when absent.
- flowers102:  `<root>/flowers-102/{jpg/, imagelabels.mat, setid.mat}` (torchvision's layout),
  official splits train 1020 / val 1020 / test 6149, downloaded when absent.
- imagefolder: `<root>` itself is the user's folder: either `train/ val/ [test/]` with class
  folders inside, or class folders directly, split by a seeded stratified `val_fraction`.
- synthetic:   `<root>/synthetic/{train,val,test}/<class>/*.png`, generated on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from finetune.backbones import InputSpec
from finetune.errors import DataUnavailableError, FinetuneError, unknown_name
from finetune.transforms import (
    CropBox,
    collate_crop_samples,
    crops_on_device,
    device_crop,
    device_normalise,
    eval_transform,
    train_transform,
)

log = logging.getLogger(__name__)

Sample = tuple[str, int]
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


@dataclass
class DatasetSplits:
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] | None = None

    def sizes(self) -> dict[str, int]:
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: len(samples) for name, samples in named.items() if samples is not None}


class DecodedImages:
    """Decode-once cache: images as uint8 tensors, resized (with the eval preset's resize) so
    that the shorter side is just above the training resolution, up to a memory budget.

    Images beyond the budget are not cached and keep streaming from disk. Eval images are stored
    at exactly the eval preset's resize size, so a cached image gives the same eval pixels as the
    file; training images keep a margin above the crop size for random crops.
    """

    def __init__(self, interpolation: str, budget_mb: float) -> None:
        self.interpolation = InterpolationMode(interpolation)
        self.budget_bytes = int(budget_mb * 2**20)
        self.used_bytes = 0
        self.images: dict[str, torch.Tensor] = {}
        self.streamed = 0  # images that did not fit in the budget

    def fill(self, paths: list[str], size: int, threads: int) -> None:
        """Decode `paths` in parallel threads (PIL releases the GIL) until the budget is used."""
        resize = v2.Resize(size, interpolation=self.interpolation, antialias=True)

        def decode(path: str) -> torch.Tensor:
            return F.pil_to_tensor(resize(load_rgb(path)))

        todo = [p for p in dict.fromkeys(paths) if p not in self.images]
        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            for start in range(0, len(todo), 64):
                if self.used_bytes >= self.budget_bytes:
                    self.streamed += len(todo) - start
                    return
                chunk = todo[start : start + 64]
                for path, pixels in zip(chunk, pool.map(decode, chunk), strict=True):
                    if self.used_bytes + pixels.numel() > self.budget_bytes:
                        self.streamed += 1
                        continue
                    self.images[path] = pixels
                    self.used_bytes += pixels.numel()

    def get(self, path: str) -> torch.Tensor | None:
        pixels = self.images.get(path)
        return None if pixels is None else tv_tensors.Image(pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency composited onto white, 16-bit and 32-bit
    greyscale scaled (PIL's own conversion would clip them), CMYK, palette and greyscale
    converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        if image.mode == "F" and pixels.max() <= 1.0:
            top = 1.0
        scaled = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")  # uint8: greyscale "L"
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)


class ImageListDataset(Dataset):
    """Images from a list of `(path, label)` samples, decoded to RGB (or taken from a decode
    cache) and transformed.

    Indexed by position, or by `(epoch, position)` as `EpochSampler` yields: then the random
    transforms of that image in that epoch are seeded by `(seed, epoch, position)`, whichever
    worker process runs them, so a resumed run augments exactly as an uninterrupted one.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable | None,
        decoded: DecodedImages | None = None,
        seed: int = 0,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.decoded = decoded
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        path, label = self.samples[index]
        image = self.decoded.get(path) if self.decoded is not None else None
        if image is None:
            image = load_rgb(path)
        if self.transform is None:
            return image, label
        if epoch is None:
            return self.transform(image), label
        # fork_rng: the caller's generator (the main process with num_workers=0) is left as is.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63)


class EpochSampler(Sampler):
    """A shuffled order per epoch from its own generator seeded by `(seed, epoch)`; yields
    `(epoch, index)`. Lightning calls `set_epoch` before every epoch. Nothing is drawn from the
    global random generators, so data order never depends on what else used them."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        # Lightning calls set_epoch before each epoch; when a distributed sampler wraps this
        # one it sets the epoch on the wrapper only, so each pass also counts as an epoch.
        self.epoch += 1
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0))
        order = torch.randperm(self.length, generator=generator).tolist()
        return iter([(epoch, index) for index in order])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """The one loader recipe. Training: an `EpochSampler` (seeded order and augmentation per
    epoch), worker seeds from the loader's own generator, and a final batch of one sample
    (which breaks BatchNorm in training mode) dropped, only in that case."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed) if train else None,
        drop_last=train and len(dataset) % batch_size == 1,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
    )


# ------------------------------------------------------------------------------------------
# Folder helpers
# ------------------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    """An image by extension, and not hidden: macOS `._name.jpg` resource forks, `.DS_Store`
    and files in hidden folders such as `.ipynb_checkpoints` are not images of the class."""
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def _folder_samples(
    folder: Path, class_names: list[str], require_every_class: bool = True
) -> list[Sample]:
    """Image files under `folder/<class>/` (recursively), labelled by position in
    `class_names`. A class folder without images is an error naming that folder."""
    samples: list[Sample] = []
    for label, class_name in enumerate(class_names):
        class_dir = folder / class_name
        found = []
        for directory, subdirs, files in os.walk(class_dir, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            found += [Path(directory) / f for f in sorted(files) if _is_image_file(Path(f))]
        if not found and require_every_class:
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


def _split_folders(root: Path, val_fraction: float, seed: int) -> DatasetSplits:
    """`root/train`, `root/val`, optional `root/test`; without `val/`, val is split from train."""
    class_names = _class_folders(root / "train")
    train = _folder_samples(root / "train", class_names)
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
        train, splits["val"] = stratified_split(train, val_fraction, seed)
    return DatasetSplits(class_names, train, splits["val"], splits["test"])


def _shuffled_by_class(samples: list[Sample], seed: int) -> list[list[Sample]]:
    """Each class's samples (classes by label) in a seeded random order, the same for a seed
    whatever the caller takes from it."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    shuffled = []
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        shuffled.append(members)
    return shuffled


def stratified_split(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split samples so that each class keeps `val_fraction` of its images in val (at least one
    when the class has two or more), reproducibly for a given seed."""
    if not 0.0 < val_fraction < 1.0:
        raise FinetuneError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
    train: list[Sample] = []
    val: list[Sample] = []
    for members in _shuffled_by_class(samples, seed):
        n_val = round(len(members) * val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    return train, val


def training_subset(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """A stratified, seeded `fraction` of `samples` (at least one image per class). For one seed
    the subsets are nested: each fraction keeps the images of every smaller one."""
    if fraction >= 1.0:
        return samples
    kept: list[Sample] = []
    for members in _shuffled_by_class(samples, seed):
        kept += members[: max(1, round(len(members) * fraction))]
    return sorted(kept)


def files_fingerprint(samples: list[Sample]) -> str:
    """The exact file list, in order, with each file's size and modification time."""
    digest = hashlib.sha256()
    for path, _label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def find_unreadable(paths: list[str], threads: int) -> dict[str, str]:
    """Files that do not decode completely (truncated, corrupt, not an image), with the reason."""

    def problem(path: str) -> str | None:
        try:
            with Image.open(path) as image:
                image.load()  # the whole file: truncation only shows when decoding
            return None
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
            return f"{type(error).__name__}: {error}"

    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        problems = dict(zip(paths, pool.map(problem, paths), strict=True))
    return {path: reason for path, reason in problems.items() if reason}


def _require_images(splits: DatasetSplits, where: Path) -> DatasetSplits:
    for split_name, count in splits.sizes().items():
        if count == 0:
            raise DataUnavailableError(
                f"The {split_name} split under {where} holds no images "
                f"(looked for {', '.join(IMG_EXTENSIONS)} in its class folders)."
            )
    return splits


# ------------------------------------------------------------------------------------------
# Dataset builders: (root, options) -> DatasetSplits
# ------------------------------------------------------------------------------------------


def build_hymenoptera(root: Path, download: bool, **_: Any) -> DatasetSplits:
    folder = root / "hymenoptera_data"
    if not (folder / "train").is_dir() and download:
        _download_archive(HYMENOPTERA_URL, root, "hymenoptera", folder)
    if not (folder / "train").is_dir():
        raise DataUnavailableError(
            f"Dataset hymenoptera not found: {folder} has no train/ folder. Fix: unzip "
            f"hymenoptera_data.zip ({HYMENOPTERA_URL}) into {root}, or set data.root to the "
            "folder that contains hymenoptera_data/."
        )
    return _require_images(_split_folders(folder, val_fraction=0.2, seed=0), folder)


def build_flowers102(root: Path, download: bool, **_: Any) -> DatasetSplits:
    from torchvision.datasets import Flowers102

    folder = root / "flowers-102"
    splits = {}
    for split in ("train", "val", "test"):
        try:
            dataset = Flowers102(str(root), split=split, download=download)
        except (RuntimeError, OSError) as error:  # torchvision: missing files or failed download
            raise DataUnavailableError(
                f"Dataset flowers102 not found or incomplete in {folder} (expected jpg/, "
                f"imagelabels.mat and setid.mat) and could not be downloaded ({error}). Fix: "
                f"place those files in {folder}, or set data.root to the folder that contains "
                "flowers-102/."
            ) from error
        # torchvision keeps the official split's files and labels in these attributes.
        splits[split] = [
            (str(p), int(y)) for p, y in zip(dataset._image_files, dataset._labels, strict=False)
        ]
    missing = [p for p, _ in splits["train"][:1] if not Path(p).is_file()]
    if missing:
        raise DataUnavailableError(
            f"Flowers102 images are missing in {folder / 'jpg'} (first missing: {missing[0]}). "
            "Fix: extract 102flowers.tgz there."
        )
    return DatasetSplits(list(Flowers102.classes), splits["train"], splits["val"], splits["test"])


def build_imagefolder(root: Path, val_fraction: float, split_seed: int, **_: Any) -> DatasetSplits:
    if not root.is_dir():
        raise DataUnavailableError(
            f"Image folder {root} does not exist. Fix: set data.root to a folder holding "
            "train/ and val/ (each with one sub-folder per class), or class folders directly."
        )
    if (root / "train").is_dir():
        return _require_images(_split_folders(root, val_fraction, split_seed), root)
    class_names = _class_folders(root)
    train, val = stratified_split(_folder_samples(root, class_names), val_fraction, split_seed)
    return _require_images(DatasetSplits(class_names, train, val), root)


SYNTHETIC_CLASSES = ("circle", "square", "stripes")


def _draw_synthetic(class_name: str, size: int, rng: random.Random) -> Image.Image:
    """A shape on a noisy background; the shape is the class, colours and placement vary."""
    background = tuple(rng.randrange(0, 90) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(rng.randrange(140, 256) for _ in range(3))
    extent = rng.randrange(size // 3, int(size * 0.8))
    left, top = rng.randrange(0, size - extent), rng.randrange(0, size - extent)
    box = (left, top, left + extent, top + extent)
    if class_name == "circle":
        draw.ellipse(box, fill=colour)
    elif class_name == "square":
        draw.rectangle(box, fill=colour)
    else:
        step = max(size // 8, 2)
        for y in range(rng.randrange(0, step), size, 2 * step):
            draw.rectangle((0, y, size, y + step - 1), fill=colour)
    return image


def build_synthetic(
    root: Path,
    synthetic: Mapping[str, Any],
    **_: Any,
) -> DatasetSplits:
    """Generate (once) a small, visually separable image set so everything runs offline."""
    folder = root / "synthetic"
    recipe = {"classes": list(SYNTHETIC_CLASSES), **dict(synthetic)}
    marker = folder / "recipe.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
        _generate_synthetic(folder, recipe)
    return _require_images(_split_folders(folder, val_fraction=0.2, seed=0), folder)


def _generate_synthetic(folder: Path, recipe: Mapping[str, Any]) -> None:
    log.info("Generating the synthetic dataset in %s", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(recipe["seed"])
    # Built beside the target and renamed into place, so a crash never leaves half a dataset.
    staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=folder.parent))
    for split in ("train", "val", "test"):
        for class_name in recipe["classes"]:
            class_dir = staging / split / class_name
            class_dir.mkdir(parents=True)
            for index in range(int(recipe[f"{split}_per_class"])):
                image = _draw_synthetic(class_name, int(recipe["image_size"]), rng)
                image.save(class_dir / f"{class_name}_{index:04d}.png")
    (staging / "recipe.json").write_text(json.dumps(dict(recipe)))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def _download_archive(url: str, root: Path, name: str, expected: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    log.info("Downloading %s from %s into %s", name, url, root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[-1]
    try:
        download_and_extract_archive(url, download_root=str(root))
    except Exception as error:  # network errors come as URLError, HTTPError, OSError...
        archive.unlink(missing_ok=True)  # never leave a partial zip that looks complete
        raise DataUnavailableError(
            f"Dataset {name} is not in {expected} and downloading {url} failed ({error}). "
            f"Fix: download and unzip it into {root} by hand, or set data.root to the folder "
            f"that contains {expected.name}/."
        ) from error


BUILDERS: dict[str, Callable[..., DatasetSplits]] = {
    "hymenoptera": build_hymenoptera,
    "flowers102": build_flowers102,
    "imagefolder": build_imagefolder,
    "synthetic": build_synthetic,
}


# ------------------------------------------------------------------------------------------
# The data module
# ------------------------------------------------------------------------------------------


class FinetuneDataModule(pl.LightningDataModule):
    """Loaders for any of the dataset layouts above, preprocessed for one backbone.

    Speed options for small datasets: `decode_cache_mb` keeps decoded, resized images in memory
    (0 turns it off); `device_transforms` moves the float conversion, normalisation and random
    erasing onto the training device (`auto`: when training on a GPU). With the default
    augmentation (random resized crop and flip) the crops, resizes and flips run there too:
    loader workers only draw each image's crop box and ship the whole uint8 image with it
    (`normalise` keeps the crops in the workers).
    """

    def __init__(
        self,
        dataset: str,
        root: str,
        input_spec: InputSpec,
        augment: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        download: bool = True,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        synthetic: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        decode_cache_mb: float = 0,
        device_transforms: bool | str = "auto",
        train_fraction: float = 1.0,
        subset_seed: int = 0,
        shuffle_seed: int = 0,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in BUILDERS:
            raise unknown_name("dataset", dataset, list(BUILDERS))
        self.dataset = dataset
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root / ".cache"
        self.input_spec = input_spec
        self.augment = dict(augment or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.download = download
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.synthetic = dict(synthetic or {})
        self.decode_cache_mb = float(decode_cache_mb or 0)
        if device_transforms not in (True, False, "auto", "normalise"):
            raise unknown_name(
                "data.device_transforms",
                str(device_transforms),
                ["auto", "true", "normalise", "false"],
            )
        self.device_transforms_option = device_transforms
        self.device_transforms = False  # decided in setup, once the training device is known
        if not 0.0 < float(train_fraction) <= 1.0:
            raise FinetuneError(
                f"data.train_fraction must be in (0, 1], got {train_fraction}: it is the share of "
                "the training split to train on."
            )
        self.train_fraction = float(train_fraction)
        self.subset_seed = int(subset_seed)
        self.shuffle_seed = int(shuffle_seed)
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped: dict[str, str] = {}  # unreadable files left out (data.skip_corrupt=true)
        self.decoded: DecodedImages | None = None
        self.crops_on_device = False  # decided in setup, with device_transforms
        self._splits: DatasetSplits | None = None
        self.datasets: dict[str, ImageListDataset] = {}

    @property
    def splits(self) -> DatasetSplits:
        """The sample lists, found (downloaded or generated when needed) on first access."""
        if self._splits is None:
            self._splits = BUILDERS[self.dataset](
                root=self.root,
                download=self.download,
                val_fraction=self.val_fraction,
                split_seed=self.split_seed,
                synthetic=self.synthetic,
            )
            if self.train_fraction < 1.0:
                self._splits.train = training_subset(
                    self._splits.train, self.train_fraction, self.subset_seed
                )
            self._splits = self._without_unreadable(self._splits)
            log.info("Dataset %s in %s: %s", self.dataset, self.root, self._splits.sizes())
        return self._splits

    def _without_unreadable(self, splits: DatasetSplits) -> DatasetSplits:
        """Decode every image once before training (remembered per exact file list under the
        cache folder): stop naming every bad file, or skip them with data.skip_corrupt=true."""
        every = [s for samples in (splits.train, splits.val, splits.test or []) for s in samples]
        record = self.cache_dir / "verified" / f"{files_fingerprint(every)}.json"
        unreadable = json.loads(record.read_text()) if record.is_file() else None
        if unreadable is None:
            unreadable = find_unreadable([path for path, _ in every], os.cpu_count() or 1)
            try:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps(unreadable))
            except OSError:  # a read-only data root: check again next time
                pass
        if not unreadable:
            return splits
        listing = "\n".join(f"  {path} ({reason})" for path, reason in sorted(unreadable.items()))
        if not self.skip_corrupt:
            raise DataUnavailableError(
                f"{len(unreadable)} image file(s) of dataset {self.dataset} cannot be read:\n"
                f"{listing}\nFix: remove or replace them, or set data.skip_corrupt=true to train "
                "without them (the run lists them in skipped_images.json)."
            )
        log.warning("Skipping %d unreadable image file(s):\n%s", len(unreadable), listing)
        self.skipped = dict(unreadable)

        def keep(samples: list[Sample] | None) -> list[Sample] | None:
            return None if samples is None else [s for s in samples if s[0] not in unreadable]

        kept = DatasetSplits(
            splits.class_names, keep(splits.train), keep(splits.val), keep(splits.test)
        )
        return _require_images(kept, self.root)

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_test_split(self) -> bool:
        return self.splits.test is not None

    def prepare_data(self) -> None:
        self.splits  # noqa: B018 - downloading/generating happens on first access

    def _training_device(self) -> torch.device | None:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else None

    def setup(self, stage: str | None = None) -> None:
        splits = self.splits
        option = self.device_transforms_option
        if option == "auto":
            device = self._training_device()
            self.device_transforms = device is not None and device.type == "cuda"
        else:
            self.device_transforms = option in (True, "normalise")
        if self.decode_cache_mb > 0 and self.decoded is None:
            self.decoded = self._decode_once(splits)
        on_device = self.device_transforms
        self.crops_on_device = on_device and option != "normalise" and crops_on_device(self.augment)
        evaluation = eval_transform(self.input_spec, normalise=not on_device)
        if self.crops_on_device:
            training = CropBox(self.input_spec, self.augment, self._train_decode_size)
        else:
            training = train_transform(
                self.input_spec,
                self.augment,
                normalise=not on_device,
                tensor_input=self.decoded is not None,
            )
        self.datasets = {
            "train": ImageListDataset(splits.train, training, self.decoded, self.shuffle_seed),
            "val": ImageListDataset(splits.val, evaluation, self.decoded),
        }
        if splits.test is not None:
            self.datasets["test"] = ImageListDataset(splits.test, evaluation, self.decoded)
        self._device_normalise = {
            train: device_normalise(self.input_spec, self.augment if train else {})
            for train in (True, False)
        }
        self._device_crop = device_crop(self.input_spec, self.augment)

    @property
    def _train_decode_size(self) -> int:
        """Shorter side of decoded training images: random crops keep ImageNet's 256/224 margin
        of resolution."""
        spec = self.input_spec
        return max(spec.resize_size, round(spec.crop_size * 256 / 224))

    def _decode_once(self, splits: DatasetSplits) -> DecodedImages:
        spec = self.input_spec
        decoded = DecodedImages(spec.interpolation, self.decode_cache_mb)
        threads = os.cpu_count() or 1
        decoded.fill([path for path, _ in splits.train], self._train_decode_size, threads)
        for samples in (splits.val, splits.test or []):
            decoded.fill([path for path, _ in samples], spec.resize_size, threads)
        log.info(
            "Decode cache: %d images in %.0f MB (%d streamed beyond data.decode_cache_mb)",
            len(decoded.images),
            decoded.used_bytes / 2**20,
            decoded.streamed,
        )
        return decoded

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.device_transforms:
            return batch
        images, labels = batch
        if isinstance(images, (tuple, list)):  # whole images with crop boxes (CropBox)
            return self._device_crop(images), labels
        training = self.trainer is not None and self.trainer.training
        return self._device_normalise[training](images), labels

    def _loader(self, split: str, train: bool) -> DataLoader:
        return make_loader(
            self.datasets[split],
            self.batch_size if train else self.eval_batch_size,
            train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            seed=self.shuffle_seed,
            collate_fn=collate_crop_samples if train and self.crops_on_device else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise FinetuneError(f"Dataset {self.dataset} has no test split; evaluate on val.")
        return self._loader("test", train=False)
