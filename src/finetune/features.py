"""The cached-feature linear probe: run the frozen backbone once, then train the head on features.

When only the head trains and the training images are not augmented, every epoch would push the
same images through the same frozen backbone. Instead the backbone runs once per image (the cost
of one forward pass over the data) and the head trains on the stored features inside the same
Lightning run: same module, metrics, logs and checkpoints (which hold the whole network).

The features are kept in memory for the process and on disk under the data root's cache folder,
keyed by everything that changes them: the backbone and a hash of its (non-head) weights, the
eval transform, the precision, and the exact files of each split (path, size, modification
time). Any change gives a new key and a fresh extraction; an identical run reuses the file.

The data module then serves the features (`FinetuneDataModule.use_features`): the same module,
batch sizes, order and last-batch rule as the images, so the head sees the same batches.

With augmentation, the linear probe is solved on the clean features and on those of augmented
views of the training images (`augmented_views`): view k of image i is drawn with the training
preset (on the CPU, from the image file) seeded by `(seed, k, i)`, and cached the same way, under
a key that adds the preset, the number of views and the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.atomic import atomic_write
from finetune.data import FinetuneDataModule, ImageListDataset, Sample, files_fingerprint, images
from finetune.progress import progress
from finetune.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the extraction changes
# Extracted features of this process, by cache key: a sweep over head settings reuses them.
_IN_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


def clear_memory_cache() -> None:
    """Forget the features extracted in this process (the cache files stay)."""
    _IN_MEMORY.clear()


def weights_fingerprint(network: nn.Module) -> str:
    """A hash of every tensor below the head (parameters and buffers such as BatchNorm
    statistics), so any change of weights file, loading or architecture changes it.
    `network` is the backbone-and-head holder of `finetune.backbones` (`head_names`)."""
    head_prefixes = tuple(f"net.{name}." for name in network.head_names)
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        if name.startswith(head_prefixes):
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cache_key_fields(
    network: nn.Module,
    transform: Any,
    precision: str,
    splits: dict[str, list[Sample]],
    channels_last: bool = False,
) -> dict[str, Any]:
    """Everything that changes the features. channels_last: another convolution kernel, other
    float roundings."""
    return {
        "format": CACHE_FORMAT,
        "backbone": network.name,
        "weights": weights_fingerprint(network),
        "transform": repr(transform),
        "decoder": images.DECODER_VERSION,  # the pixels the transform starts from
        "precision": str(precision),
        "channels_last": channels_last,
        "splits": {name: files_fingerprint(samples) for name, samples in splits.items()},
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


@torch.no_grad()
def extract(
    network: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    channels_last: bool = False,
    keys: Iterable[Any] | None = None,
) -> torch.Tensor:
    """`forward_features` of every image of `dataset`, in order (or of the dataset's items
    `keys`, in their order), as float32 `(N, D)` on the CPU. `forward_context`: the precision
    context of each forward pass (Lightning's `trainer.precision_plugin.forward_context`,
    autocast for mixed precision)."""
    was_training = network.training
    network.eval()
    order = None if keys is None else list(keys)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=order,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks = []
    total = len(dataset) if order is None else len(order)  # type: ignore[arg-type]
    try:
        with progress("Extracting features", total, "images") as advance:
            for images, _labels in loader:
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with forward_context():
                    # Kept on the device until the end (a few KB per image): copying each
                    # batch out would make the CPU wait for the GPU before it could queue the
                    # next one.
                    chunks.append(network.forward_features(images).float())
                advance(len(images))
    finally:
        network.train(was_training)
    return torch.cat(chunks).cpu()


def cached_features(
    datamodule: FinetuneDataModule,
    network: nn.Module,
    trainer: pl.Trainer,
    channels_last: bool = False,
    only: tuple[str, ...] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The features of every split of the prepared `datamodule` (or of those named in `only`)
    under `network` (split name -> float32 `(N, D)`, in the splits' order), extracted on the
    trainer's device with its precision only on a cache miss; pass them to
    `datamodule.use_features`.

    Returns them with a small report (`hit` or `miss`, seconds, cache file) for metrics.json.
    """
    splits = {
        name: samples
        for name, samples in datamodule.splits.named().items()
        if only is None or name in only
    }
    transform = eval_transform(datamodule.input_spec)
    fields = cache_key_fields(network, transform, str(trainer.precision), splits, channels_last)
    cache_file = datamodule.cache_dir / "features" / f"{network.name}-{cache_key(fields)}.pt"

    def compute() -> dict[str, torch.Tensor]:
        # One loader over every split: one set of worker processes, no pipeline restarts.
        every_split = [sample for samples in splits.values() for sample in samples]
        extracted = _extract_on_trainer(
            network, trainer, datamodule, ImageListDataset(every_split, transform), channels_last
        )
        return dict(zip(splits, extracted.split([len(s) for s in splits.values()]), strict=True))

    return _load_or_compute(fields, cache_file, compute, f"features of {network.name}")


def augmented_views(
    datamodule: FinetuneDataModule,
    network: nn.Module,
    trainer: pl.Trainer,
    views: int,
    seed: int,
    channels_last: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The features of `views` augmented views of every training image: float32
    `(views * N, D)`, view-major (view 0's N images in the training split's order, then view
    1's, ...). View k of image i is drawn with the training preset (`data.augment`, on the
    CPU from the image file) seeded by `(seed, k, i)`, whatever the number of workers; the
    global random generators are left as they were. Extracted on the trainer's device only on
    a cache miss (the key adds the preset, `views` and `seed` to `cached_features`' own).

    Returns them with a small report (`hit` or `miss`, seconds, cache file)."""
    samples = datamodule.splits.train
    transform = train_transform(datamodule.input_spec, datamodule.augment)
    fields = cache_key_fields(
        network, transform, str(trainer.precision), {"train": samples}, channels_last
    ) | {"views": views, "seed": seed}
    cache_file = datamodule.cache_dir / "features" / f"{network.name}-views-{cache_key(fields)}.pt"

    def compute() -> dict[str, torch.Tensor]:
        dataset = ImageListDataset(samples, transform, seed=seed)
        keys = [(view, index) for view in range(views) for index in range(len(samples))]
        return {
            "views": _extract_on_trainer(network, trainer, datamodule, dataset, channels_last, keys)
        }

    # Not kept in memory: K times the clean features, and a sweep reads the file in seconds.
    extracted, report = _load_or_compute(
        fields,
        cache_file,
        compute,
        f"features of {views} augmented views of the training images",
        keep_in_memory=False,
    )
    return extracted["views"], report


def _extract_on_trainer(
    network: nn.Module,
    trainer: pl.Trainer,
    datamodule: FinetuneDataModule,
    dataset: Dataset,
    channels_last: bool,
    keys: list[Any] | None = None,
) -> torch.Tensor:
    """`extract` on the trainer's device with its precision, the network put back after."""
    original_device = next(network.parameters()).device
    device = trainer.strategy.root_device
    network.to(device)
    # The extraction must not draw from the global RNG, so that a cached run consumes
    # random numbers exactly as the uncached run does (same shuffles, same dropout masks).
    with torch.random.fork_rng(devices=[]):
        extracted = extract(
            network,
            dataset,
            batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            device=device,
            forward_context=trainer.precision_plugin.forward_context,
            channels_last=channels_last,
            keys=keys,
        )
    network.to(original_device)
    return extracted


def _load_or_compute(
    fields: dict[str, Any],
    cache_file: Path,
    compute: Callable[[], dict[str, torch.Tensor]],
    what: str,
    keep_in_memory: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors stored under `fields` (this process's memory, then `cache_file`), or those
    `compute` returns, written to `cache_file` (and kept in this process's memory for the
    next run of a sweep when `keep_in_memory`); with the report for metrics.json."""
    key = cache_key(fields)
    started = time.perf_counter()
    features = _IN_MEMORY.get(key) or _read(cache_file, fields)
    status = "hit" if features is not None else "miss"
    if features is None:
        log.info("Extracting %s once (cache miss)", what)
        features = compute()
        _write(cache_file, fields, features)
    else:
        log.info("Reusing cached %s (%s)", what, cache_file)
    if keep_in_memory:
        _IN_MEMORY[key] = features
    report = {
        "feature_cache": status,
        "feature_cache_seconds": round(time.perf_counter() - started, 2),
        "feature_cache_file": str(cache_file),
        "feature_rows": {name: len(tensor) for name, tensor in features.items()},
    }
    return features, report


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
    """Atomically: a crash mid-write never leaves a cache file that looks complete."""
    payload = {"fields": json.dumps(fields, sort_keys=True), "features": features}
    try:
        atomic_write(cache_file, lambda handle: torch.save(payload, handle))
    except OSError as error:  # a read-only data root still trains, from memory
        log.warning("Could not write the feature cache %s (%s)", cache_file, error)
