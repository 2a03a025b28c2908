"""The cached-feature linear probe: run the frozen backbone once, then train the head on features.

When only the head trains and the training images are not augmented, every epoch would push the
same images through the same frozen backbone. Instead the backbone runs once per image (the cost
of one forward pass over the data) and the head trains on the stored features inside the same
Lightning run: same module, metrics, logs and checkpoints (which hold the whole network).

The features are kept in memory for the process and on disk under the data root's cache folder,
keyed by everything that changes them: the backbone and a hash of its (non-head) weights, the
eval transform, the precision, and the exact files of each split (path, size, modification
time). Any change gives a new key and a fresh extraction; an identical run reuses the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.backbones import Network
from finetune.data import (
    FinetuneDataModule,
    ImageListDataset,
    Sample,
    files_fingerprint,
    make_loader,
)
from finetune.transforms import eval_transform

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the extraction changes
# Extracted features of this process, by cache key: a sweep over head settings reuses them.
_IN_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


def weights_fingerprint(backbone: Network) -> str:
    """A hash of every tensor below the head (parameters and buffers such as BatchNorm
    statistics), so any change of weights file, loading or architecture changes it."""
    head = backbone.head_parameter_names()
    digest = hashlib.sha256()
    for name, tensor in backbone.net.state_dict().items():
        if name in head:
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cache_key_fields(
    backbone: Network,
    transform: Any,
    precision: str,
    splits: dict[str, list[Sample]],
    channels_last: bool = False,
) -> dict[str, Any]:
    """Everything that changes the features. channels_last: another convolution kernel, other
    float roundings."""
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone.name,
        "weights": weights_fingerprint(backbone),
        "transform": repr(transform),
        "precision": str(precision),
        "channels_last": channels_last,
        "splits": {name: files_fingerprint(samples) for name, samples in splits.items()},
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def autocast_for(precision: str, device: torch.device):
    """The autocast context Lightning's precision setting would use for a forward pass."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def extract(
    backbone: Network,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str = "32",
    channels_last: bool = False,
) -> torch.Tensor:
    """`forward_features` of every image of `dataset`, in order, as float32 on the CPU."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    try:
        for images, _labels in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_for(precision, device):
                # Kept on the device until the end (a few KB per image): copying each batch
                # out would make the CPU wait for the GPU before it could queue the next one.
                chunks.append(backbone.forward_features(images).float())
    finally:
        backbone.train(was_training)
    return torch.cat(chunks).cpu()


class FeatureDataset(Dataset):
    """Cached features and labels; accepts `EpochSampler`'s `(epoch, index)` keys."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[1] if isinstance(key, tuple) else key
        return self.features[index], self.labels[index]


class FeatureDataModule(pl.LightningDataModule):
    """Loaders over cached features and the image data module's labels; same batch sizes,
    shuffling and last-batch rule as the image loaders, so the head sees the same batches."""

    def __init__(self, images: FinetuneDataModule, features: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.images = images
        self.features = features
        self.datasets: dict[str, FeatureDataset] = {}

    # The run reads these from whichever data module it trains on.
    @property
    def class_names(self) -> list[str]:
        return self.images.class_names

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    @property
    def splits(self):
        return self.images.splits

    @property
    def has_test_split(self) -> bool:
        return self.images.has_test_split

    def setup(self, stage: str | None = None) -> None:
        samples = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}
        self.datasets = {
            split: FeatureDataset(features, torch.tensor([label for _, label in samples[split]]))
            for split, features in self.features.items()
        }

    def _loader(self, split: str, train: bool) -> DataLoader:
        batch_size = self.images.batch_size if train else self.images.eval_batch_size
        # Features are already in memory: worker processes would only add start-up time.
        return make_loader(
            self.datasets[split], batch_size, train, num_workers=0, seed=self.images.shuffle_seed
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def cached_features(
    images: FinetuneDataModule,
    backbone: Network,
    device: torch.device,
    precision: str,
    channels_last: bool = False,
) -> tuple[FeatureDataModule, dict[str, Any]]:
    """The feature data module for `images` under `backbone`, extracting only on a cache miss.

    Returns it with a small report (`hit` or `miss`, seconds, cache file) for metrics.json.
    """
    splits = {"train": images.splits.train, "val": images.splits.val}
    if images.splits.test is not None:
        splits["test"] = images.splits.test
    transform = eval_transform(images.input_spec)
    fields = cache_key_fields(backbone, transform, precision, splits, channels_last)
    key = cache_key(fields)
    cache_file = images.cache_dir / "features" / f"{backbone.name}-{key}.pt"
    started = time.perf_counter()
    features = _IN_MEMORY.get(key) or _read(cache_file, fields)
    status = "hit" if features is not None else "miss"
    if features is None:
        log.info("Extracting features of %s once for every split (cache miss)", backbone.name)
        original_device = next(backbone.parameters()).device
        backbone.to(device)
        # The extraction must not draw from the global RNG, so that a cached run consumes
        # random numbers exactly as the uncached run does (same shuffles, same dropout masks).
        with torch.random.fork_rng(devices=[]):
            # One loader over every split: one set of worker processes, no pipeline restarts.
            every_split = [sample for samples in splits.values() for sample in samples]
            extracted = extract(
                backbone,
                ImageListDataset(every_split, transform),
                batch_size=images.eval_batch_size,
                num_workers=images.num_workers,
                device=device,
                precision=precision,
                channels_last=channels_last,
            )
        sizes = [len(samples) for samples in splits.values()]
        features = dict(zip(splits, extracted.split(sizes), strict=True))
        backbone.to(original_device)
        _write(cache_file, fields, features)
    else:
        log.info("Reusing cached features of %s (%s)", backbone.name, cache_file)
    _IN_MEMORY[key] = features
    report = {
        "feature_cache": status,
        "feature_cache_seconds": round(time.perf_counter() - started, 2),
        "feature_cache_file": str(cache_file),
    }
    return FeatureDataModule(images, features), report


def _read(cache_file: Path, fields: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    if not cache_file.is_file():
        return None
    try:
        stored = torch.load(cache_file, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache file is recomputed, never trusted
        log.warning("Ignoring unreadable feature cache %s (%s)", cache_file, error)
        return None
    if stored.get("fields") != json.dumps(fields, sort_keys=True):
        return None
    return stored["features"]


def _write(cache_file: Path, fields: dict[str, Any], features: dict[str, torch.Tensor]) -> None:
    """Write then rename: a crash mid-write never leaves a cache file that looks complete."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.partial")
        torch.save({"fields": json.dumps(fields, sort_keys=True), "features": features}, partial)
        os.replace(partial, cache_file)
    except OSError as error:  # a read-only data root still trains, from memory
        log.warning("Could not write the feature cache %s (%s)", cache_file, error)
