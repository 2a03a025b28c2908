"""Datasets, the seeded epoch sampler, the one loader recipe, and seeded splits and subsets.

Samples are explicit `(image path, class index)` lists: splits, subsets and caches stay easy to
reason about and to test. Every random choice here comes from its own seeded generator, never
from the global ones, so a resumed run sees exactly the data of an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.images import DecodedImages, load_rgb
from finetune.errors import FinetuneError
from finetune.lightning_internals import UnrepeatedDistributedSampler

Sample = tuple[str, int]


@dataclass
class DatasetSplits:
    """The class names and, per split, the `(image path, class index)` samples; `val_from`
    says in words how the val split was made (split.json records it)."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] | None = None
    val_from: str = ""

    def sizes(self) -> dict[str, int]:
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: len(samples) for name, samples in named.items() if samples is not None}

    def named(self) -> dict[str, list[Sample]]:
        """The splits that exist, by name, in the order train, val, test."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: samples for name, samples in named.items() if samples is not None}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63)


class ImageListDataset(Dataset):
    """Images from a list of `(path, label)` samples, decoded with `load_rgb` (or taken from a
    decode cache) and transformed.

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


class FeatureDataset(Dataset):
    """Cached features `(N, D)` and labels `(N,)`; accepts `EpochSampler`'s `(epoch, index)`
    keys (features have no random transform, the epoch is not needed)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[1] if isinstance(key, tuple) else key
        return self.features[index], self.labels[index]


class EpochSampler(Sampler):
    """A shuffled order per epoch from its own generator seeded by `(seed, epoch)`; yields
    `(epoch, index)`. Lightning calls `set_epoch` before every epoch, but after it created the
    first epoch's iterator, whose worker processes already drew keys: a loader made for a
    resumed run starts at the resumed `epoch`. Nothing is drawn from the global random
    generators, so data order never depends on what else used them."""

    def __init__(self, length: int, seed: int, epoch: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        # Lightning calls set_epoch before each epoch (its distributed wrapper passes it on);
        # each pass also counts as an epoch, for a wrapper that does not.
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
    sampler: Sampler | None = None,
    processes: int = 1,
    first_epoch: int = 0,
) -> DataLoader:
    """The one loader recipe. Training: `sampler`, else an `EpochSampler` (seeded order and
    augmentation per epoch), worker seeds from the loader's own generator, and a final batch
    of one sample (which breaks BatchNorm in training mode) dropped, only in that case.
    Evaluation: the dataset's order, or `sampler`'s (`evaluation_sampler`, with several
    processes).

    `processes`: how many processes train, each on its own share of `ceil(len / processes)`
    samples (Lightning's distributed sampler pads the split to equal shares): the final batch
    of one is that of a share, not of the whole split. `first_epoch`: the epoch a training
    loader's first iteration is (a resumed run's, see `EpochSampler`)."""
    if train and sampler is None:
        sampler = EpochSampler(len(dataset), seed, first_epoch)
    share = -(-len(dataset) // max(processes, 1))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and share % batch_size == 1,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
    )


def evaluation_sampler(
    dataset: Dataset, split: str, num_replicas: int, rank: int
) -> UnrepeatedDistributedSampler:
    """This process's share of an evaluation split when `num_replicas` processes evaluate it:
    positions `rank, rank + num_replicas, ...` of `dataset`, so that together the processes see
    every image exactly once (Lightning's own `DistributedSampler` pads the split with repeated
    images to give every process the same count, which counts those images twice). The shares
    differ by at most one image; the module's metrics and the evaluation report are torchmetrics
    states, which add up uneven shares exactly.

    Raises `FinetuneError` when the split has fewer images than processes: a process without a
    batch would leave the others waiting for it.
    """
    if len(dataset) < num_replicas:
        raise FinetuneError(
            f"The {split} split has {len(dataset)} image(s) but {num_replicas} processes "
            "evaluate it (trainer.devices x trainer.num_nodes), and each needs at least one. "
            f"Fix: trainer.devices={max(len(dataset), 1)} or fewer, or more {split} images."
        )
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=False
    )


def image_datasets(
    splits: DatasetSplits,
    training: Callable,
    evaluation: Callable,
    decoded: DecodedImages | None,
    seed: int,
) -> dict[str, Dataset]:
    """Per split, its images with the `training` transform (seeded per epoch and image by
    `seed`) for train and the `evaluation` transform for the others."""
    datasets: dict[str, Dataset] = {
        split: ImageListDataset(samples, evaluation, decoded)
        for split, samples in splits.named().items()
    }
    datasets["train"] = ImageListDataset(splits.train, training, decoded, seed)
    return datasets


def feature_datasets(
    splits: DatasetSplits, features: dict[str, torch.Tensor]
) -> dict[str, Dataset]:
    """Per split of `features`, its cached features `(N, D)` with the labels of its samples."""
    return {
        split: FeatureDataset(features[split], torch.tensor([label for _, label in samples]))
        for split, samples in splits.named().items()
        if split in features
    }


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
    samples: list[Sample],
    val_fraction: float,
    seed: int,
    copies: Mapping[str, str] | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Split samples so that each class keeps `val_fraction` of its images in val (at least one
    when the class has two or more), reproducibly for a given seed. `copies` maps a file to an
    earlier one with the same bytes (`duplicates.originals`): a copy goes where its original
    goes, so no image is both trained on and validated on; without copies the split is the one
    of the samples alone. Raises `FinetuneError` for a fraction outside (0, 1)."""
    if not 0.0 < val_fraction < 1.0:
        raise FinetuneError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
    copies = {path: first for path, first in (copies or {}).items() if path != first}
    train: list[Sample] = []
    val: list[Sample] = []
    singles = [sample for sample in samples if sample[0] not in copies]
    for members in _shuffled_by_class(singles, seed):
        n_val = round(len(members) * val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    in_val = {path for path, _ in val}
    for sample in samples:
        if sample[0] in copies:
            (val if copies[sample[0]] in in_val else train).append(sample)
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
