"""The one LightningDataModule: images of any layout, or the cached features of those images.

Lifecycle: `prepare_data()` puts the files in place (downloads or generates them when absent),
lists the splits and checks that every image decodes; the run calls it before anything else, so
a missing or corrupt dataset stops the run before any training. `setup()` builds the datasets
(and the decode cache) once the training device is known. `use_features()` switches the same
module to serve cached backbone features with the same batch sizes, order and last-batch rule.
`splits`, `class_names`, `num_classes` and `has_test_split` only read state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.backbones import InputSpec
from finetune.data.images import DecodedImages, decode_once
from finetune.data.layouts import LayoutOptions, layout
from finetune.data.loading import (
    DatasetSplits,
    FeatureDataset,
    ImageListDataset,
    make_loader,
    training_subset,
)
from finetune.data.verify import without_unreadable
from finetune.errors import FinetuneError, unknown_name
from finetune.transforms import DEVICE_TRANSFORMS_OPTIONS, Preprocessing

log = logging.getLogger(__name__)


class FinetuneDataModule(pl.LightningDataModule):
    """Loaders for one dataset layout, preprocessed for one backbone's `InputSpec`.

    The arguments are the keys of the `data` config group, which holds their defaults
    (conf/data/_common.yaml); `augment` is `data.augment`, `synthetic` the synthetic recipe.
    `decode_cache_mb` keeps decoded, resized images in memory (MiB, 0 turns it off);
    `device_transforms` is explained in `finetune.transforms.Preprocessing`.
    Raises `FinetuneError` for an unknown dataset, device_transforms or train_fraction.
    """

    def __init__(
        self,
        *,
        dataset: str,
        root: str,
        input_spec: InputSpec,
        augment: Mapping[str, Any],
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        download: bool,
        val_fraction: float,
        split_seed: int,
        cache_dir: str | None,
        decode_cache_mb: float,
        device_transforms: bool | str,
        train_fraction: float,
        subset_seed: int,
        shuffle_seed: int,
        skip_corrupt: bool,
        synthetic: Mapping[str, Any] | None = None,  # only the synthetic layout has a recipe
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.layout = layout(dataset)
        self.root = Path(root).expanduser()
        self.layout_options = LayoutOptions(
            self.root, bool(download), float(val_fraction), int(split_seed), dict(synthetic or {})
        )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root / ".cache"
        self.input_spec = input_spec
        self.augment = dict(augment or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.decode_cache_mb = float(decode_cache_mb or 0)
        if device_transforms not in DEVICE_TRANSFORMS_OPTIONS:
            raise unknown_name(
                "data.device_transforms",
                str(device_transforms),
                ["auto", "true", "normalise", "false"],
            )
        self.device_transforms_option = device_transforms
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
        self.preprocessing: Preprocessing | None = None  # decided in setup (needs the device)
        self.features: dict[str, torch.Tensor] | None = None  # set by use_features
        self._splits: DatasetSplits | None = None
        self.datasets: dict[str, Dataset] = {}

    # --- preparing: explicit steps, never a side effect of reading ---------------------------

    def prepare_data(self) -> None:
        """Download or generate the dataset when absent, then list and verify its splits.

        Raises `DataUnavailableError` (missing dataset, empty class, unreadable images) naming
        the folder or files and the fix. Repeated calls do nothing more."""
        if self._splits is not None:  # the run prepared before fit; Lightning calls it again
            return
        self.layout.fetch(self.layout_options)
        self._list_splits()

    def _list_splits(self) -> None:
        """The splits from the files in place (no download): subset, verified. Once."""
        if self._splits is not None:
            return
        splits = self.layout.build(self.layout_options)
        splits.train = training_subset(splits.train, self.train_fraction, self.subset_seed)
        self._splits, self.skipped = without_unreadable(
            splits, self.cache_dir, self.skip_corrupt, self.dataset, self.root
        )
        log.info("Dataset %s in %s: %s", self.dataset, self.root, self._splits.sizes())

    @property
    def splits(self) -> DatasetSplits:
        """The sample lists; raises `FinetuneError` before `prepare_data()` or `setup()`."""
        if self._splits is None:
            raise FinetuneError(
                f"The splits of dataset {self.dataset} are read before the data was prepared. "
                "Fix: call datamodule.prepare_data() (or setup()) first."
            )
        return self._splits

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_test_split(self) -> bool:
        return self.splits.test is not None

    # --- datasets ---------------------------------------------------------------------------

    def use_features(self, features: Mapping[str, torch.Tensor]) -> None:
        """Serve `features[split]` (`(N, D)` float tensors in the order of `splits`) instead of
        images from now on; raises `FinetuneError` when a split's count does not match."""
        sizes = self.splits.sizes()
        counts = {split: len(tensor) for split, tensor in features.items()}
        if counts != sizes:
            raise FinetuneError(
                f"Cached features of {counts} samples do not match the splits {sizes}. Fix: "
                f"delete the feature cache under {self.cache_dir / 'features'}."
            )
        self.features = dict(features)
        self.datasets = {}

    def setup(self, stage: str | None = None) -> None:
        self._list_splits()  # a rank that did not prepare lists the files now
        if self.features is not None:
            self.datasets = {
                split: FeatureDataset(
                    self.features[split], torch.tensor([label for _, label in samples])
                )
                for split, samples in self.splits.named().items()
            }
            return
        trainer = getattr(self, "trainer", None)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        if self.decode_cache_mb > 0 and self.decoded is None:
            named = self.splits.named()
            self.decoded = decode_once(
                self.input_spec,
                self.decode_cache_mb,
                train=[path for path, _ in named.pop("train")],
                evaluation=[[path for path, _ in samples] for samples in named.values()],
                threads=os.cpu_count() or 1,
            )
        self.preprocessing = Preprocessing(
            self.input_spec,
            self.augment,
            self.device_transforms_option,
            on_gpu,
            tensor_input=self.decoded is not None,
        )
        training, evaluation = self.preprocessing.train, self.preprocessing.eval
        self.datasets = {
            split: ImageListDataset(samples, evaluation, self.decoded)
            for split, samples in self.splits.named().items()
        }
        self.datasets["train"] = ImageListDataset(
            self.splits.train, training, self.decoded, self.shuffle_seed
        )

    @property
    def device_transforms(self) -> bool:
        """Whether batches are finished on the training device (decided in `setup`)."""
        return self.features is None and self.preprocessing is not None and (
            self.preprocessing.on_device
        )

    @property
    def crops_on_device(self) -> bool:
        """Whether training crops are cut on the training device (decided in `setup`)."""
        return self.device_transforms and self.preprocessing.crops_on_device

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.device_transforms:
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.preprocessing.finish(batch, training)

    # --- loaders ----------------------------------------------------------------------------

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            raise FinetuneError(f"Dataset {self.dataset} has no {split} split; evaluate on val.")
        if self.features is not None:
            # Features are already in memory: worker processes would only add start-up time.
            workers, pin, persistent, collate = 0, False, False, None
        else:
            workers, pin, persistent = self.num_workers, self.pin_memory, self.persistent_workers
            collate = self.preprocessing.collate_train if train else None
        return make_loader(
            self.datasets[split],
            self.batch_size if train else self.eval_batch_size,
            train,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=persistent,
            seed=self.shuffle_seed,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
