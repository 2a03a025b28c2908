"""The one LightningDataModule: images of any layout, or the cached features of those images.

Lifecycle: `prepare_data()` puts the files in place (downloads or generates them when absent),
lists the splits and checks that every image decodes; the run calls it before anything else, so
a missing or corrupt dataset stops the run before any training. `setup()` builds the datasets
(and the decode cache) once the training device is known and, with several processes, the
share of each evaluation split this process evaluates (every image exactly once in all).
`use_features()` switches the same module to serve cached backbone features with the same batch
sizes, order and last-batch rule.
`splits`, `class_names`, `num_classes` and `has_test_split` only read state.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, Subset

from finetune.config import check_fields
from finetune.config.schema import DataConfig
from finetune.config.values import AUTO, BALANCED
from finetune.data.balance import (
    BalancedSampler,
    check_class_names,
    class_weights,
    expected_class_weight,
)
from finetune.data.duplicates import across_splits
from finetune.data.folds import check_fold, fold_split
from finetune.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodedImages,
    allow_pixels,
    decode_once,
)
from finetune.data.layouts import LayoutOptions, fetch_nothing, layout, split_listing
from finetune.data.loading import (
    DatasetSplits,
    evaluation_sampler,
    feature_datasets,
    image_datasets,
    make_loader,
    training_subset,
)
from finetune.data.verify import content_digests, without_unreadable
from finetune.errors import FinetuneError
from finetune.input_spec import InputSpec
from finetune.lightning_internals import epochs_processed
from finetune.transforms import Preprocessing

log = logging.getLogger(__name__)


def project_cache_dir() -> str:
    """The default of `paths.cache_dir` (the schema's), resolved: `$FINETUNE_CACHE_DIR`, else
    `$XDG_CACHE_HOME/finetune-lab`, else `~/.cache/finetune-lab` (with `~` unexpanded)."""
    from omegaconf import OmegaConf

    from finetune.config.schema import PROJECT_CACHE_DIR

    return str(OmegaConf.create({"cache_dir": PROJECT_CACHE_DIR}).cache_dir)


def _report_duplicates(groups: list[dict[str, list[str]]]) -> None:
    """One warning when files of val or test are byte-identical to files of another split:
    the model is then evaluated partly on images it trained on."""
    if not groups:
        return
    examples = "; ".join(
        " = ".join(f"{split}:{Path(path).name}" for split, paths in group.items() for path in paths)
        for group in groups[:3]
    )
    log.warning(
        "%d image(s) lie byte-identical in more than one split (e.g. %s): their val/test "
        "numbers are measured on images the model trained on. split.json lists them under "
        "'duplicates'. Fix: delete the copies from one split.",
        len(groups),
        examples,
    )


class FinetuneDataModule(pl.LightningDataModule):
    """Loaders for one dataset layout, preprocessed for one backbone's `InputSpec`.

    The arguments are the keys of the `data` config group, which holds their defaults
    (`finetune.config.schema.DataConfig`); `augment` is `data.augment`, `synthetic` the synthetic recipe.
    `decode_cache_mb` keeps decoded, resized images in memory (MiB, 0 turns it off);
    `cache_dir` holds the verified-image records and cached features (None: the project's
    default, `project_cache_dir()`);
    `device_transforms` is explained in `finetune.transforms.Preprocessing`;
    `batch_size="auto"` is chosen from the listed splits by `finetune.adaptive.resolve`, whose
    value the run sets as `batch_size` before any loader is made.
    Raises `UnknownNameError` for an unknown dataset and `ConfigError` for a value the data
    schema does not allow.
    """

    def __init__(
        self,
        *,
        dataset: str,
        root: str,
        input_spec: InputSpec,
        augment: Mapping[str, Any],
        batch_size: int | str,
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
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        synthetic: Mapping[str, Any] | None = None,  # only the synthetic layout has a recipe
        labels: Mapping[str, Any] | None = None,  # only the csv layout reads a labels file
        folds: int | None = None,
        fold: int = 0,
        class_weights: Any = "none",
        sampler: str = "none",
    ) -> None:
        super().__init__()
        checked = {"batch_size": batch_size, "eval_batch_size": eval_batch_size}
        checked |= {"num_workers": num_workers, "val_fraction": val_fraction}
        checked |= {"device_transforms": device_transforms, "train_fraction": train_fraction}
        checked |= {"max_image_pixels": max_image_pixels, "folds": folds, "fold": fold}
        checked |= {"class_weights": class_weights, "sampler": sampler}
        check_fields(checked, DataConfig, "data")
        self.dataset, self.layout = dataset, layout(dataset)
        self.root = Path(root).expanduser()
        self.layout_options = LayoutOptions(
            self.root,
            bool(download),
            float(val_fraction),
            int(split_seed),
            dict(synthetic or {}),
            dict(labels or {}),
        )
        # The project's folder, not the dataset's: a user's photo folder is only ever read.
        self.cache_dir = Path(cache_dir or project_cache_dir()).expanduser()
        self.input_spec, self.augment = input_spec, dict(augment or {})
        # "auto" until the run sets the value finetune.adaptive chose from the listed splits
        self.batch_size, self._eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.decode_cache_mb = float(decode_cache_mb or 0)
        self.device_transforms_option = device_transforms
        self.train_fraction, self.subset_seed = float(train_fraction), int(subset_seed)
        self.shuffle_seed, self.skip_corrupt = int(shuffle_seed), bool(skip_corrupt)
        check_fold(folds, fold)
        self.folds, self.fold = folds, fold  # k-fold cross-validation: val is fold `fold`
        # the loss's weight per class (data.class_weights; set with the splits) and the order
        self.class_weights_option, self.sampler = class_weights, sampler
        self.class_weight: list[float] | None = None
        allow_pixels(max_image_pixels)  # for this process and the loader workers it forks
        self.skipped: dict[str, str] = {}  # unreadable files left out (data.skip_corrupt=true)
        self.duplicates: list[dict[str, list[str]]] = []  # byte-identical across splits
        self.decoded: DecodedImages | None = None
        self.preprocessing: Preprocessing | None = None  # decided in setup (needs the device)
        self.features: dict[str, torch.Tensor] | None = None  # set by use_features
        self._splits: DatasetSplits | None = None
        self.datasets: dict[str, Dataset] = {}
        self.evaluation_samplers: dict[str, Sampler] = {}  # set in setup, with several processes

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
        check_class_names(self.class_weights_option, splits.class_names)  # before verifying
        if self.folds:
            splits = fold_split(splits, self.folds, self.fold, self.layout_options.split_seed)
        splits.train = training_subset(splits.train, self.train_fraction, self.subset_seed)
        self._splits, self.skipped = without_unreadable(
            splits, self.cache_dir, self.skip_corrupt, self.dataset, self.root
        )
        self.duplicates = across_splits(self._splits, content_digests(self._splits, self.cache_dir))
        _report_duplicates(self.duplicates)
        labels = [label for _, label in self._splits.train]
        self.class_weight = class_weights(self.class_weights_option, self.class_names, labels)
        log.info(
            "Dataset %s in %s: %s (caches in %s)",
            self.dataset,
            self.root,
            self._splits.sizes(),
            self.cache_dir,
        )

    @property
    def eval_batch_size(self) -> int | str:
        """Images per evaluation batch: data.eval_batch_size, else the training batch size."""
        return self._eval_batch_size or self.batch_size

    @property
    def splits(self) -> DatasetSplits:
        """The sample lists; raises `FinetuneError` before `prepare_data()` or `setup()`."""
        if self._splits is None:
            raise FinetuneError(
                f"The splits of dataset {self.dataset} are read before the data was prepared. "
                "Fix: call datamodule.prepare_data() (or setup()) first."
            )
        return self._splits

    def split_record(self) -> dict[str, Any]:
        """What went where: the dataset, its root, how val was made, the training subset and
        split -> class -> files (relative to the root); split.json in the run dir."""
        return {
            "dataset": self.dataset,
            "root": str(self.root),
            "val_split": self.splits.val_from,
            "train_fraction": self.train_fraction,
            "subset_seed": self.subset_seed,
            "sizes": self.splits.sizes(),
            "files": split_listing(self.splits, self.root),
            "fold": {"index": self.fold, "of": self.folds} if self.folds else None,
            # byte-identical files in more than one split: split -> paths, per group
            "duplicates": [
                {split: [self._relative(path) for path in paths] for split, paths in group.items()}
                for group in self.duplicates
            ],
        }

    def _relative(self, path: str) -> str:
        """`path` relative to the data root where it lies under it (as split.json's files)."""
        with contextlib.suppress(ValueError):
            return Path(path).relative_to(self.root).as_posix()
        return path

    @property
    def reads_user_folder(self) -> bool:
        """Whether the data is the user's own folder, only ever read (never downloaded into,
        generated or created)."""
        return self.layout.fetch is fetch_nothing

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_test_split(self) -> bool:
        return self.splits.test is not None

    def solved_class_weight(self, class_weight: torch.Tensor | None) -> torch.Tensor | None:
        """The class weights of the solved linear probe's loss for a training loss weighted by
        `class_weight` ((classes,) or None): the expected loss of this module's training batches
        (`finetune.data.balance.expected_class_weight`: with data.sampler=balanced, times the
        balanced weights)."""
        labels = torch.tensor([label for _, label in self.splits.train])
        return expected_class_weight(class_weight, self.sampler, labels, self.class_names)

    def use_features(self, features: Mapping[str, torch.Tensor]) -> None:
        """Serve `features[split]` (`(N, D)` float tensors in the order of the split's samples)
        instead of images from now on, for every split of `features`; the other splits stay
        images. Raises `FinetuneError` when a split's count does not match."""
        served = dict(features)
        sizes = self.splits.sizes()
        if any(len(tensor) != sizes.get(split) for split, tensor in served.items()):
            raise FinetuneError(
                f"Cached features do not match the splits {sizes}. Fix: delete the feature "
                f"cache under {self.cache_dir / 'features'}."
            )
        self.features, self.datasets = served, {}

    def setup(self, stage: str | None = None) -> None:
        self._list_splits()  # a rank that did not prepare lists the files now
        features = self.features or {}
        image_splits = [split for split in self.splits.named() if split not in features]
        self.datasets = self._image_datasets(image_splits) if image_splits else {}
        self.datasets |= feature_datasets(self.splits, features)
        # Built here, before any training, so that too small a split for the processes stops
        # the run at once; Lightning would otherwise pad each split (see evaluation_sampler).
        self.evaluation_samplers = self._evaluation_samplers()

    def _image_datasets(self, image_splits: list[str]) -> dict[str, Dataset]:
        """Datasets of the images of `image_splits` (only those are decoded ahead)."""
        if self.decode_cache_mb > 0 and self.decoded is None:
            named = {s: v for s, v in self.splits.named().items() if s in image_splits}
            self.decoded = decode_once(
                self.input_spec,
                self.decode_cache_mb,
                train=[path for path, _ in named.pop("train", [])],
                evaluation=[[path for path, _ in samples] for samples in named.values()],
                threads=os.cpu_count() or 1,
            )
        trainer = getattr(self, "trainer", None)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        self.preprocessing = Preprocessing(
            self.input_spec,
            self.augment,
            self.device_transforms_option,
            on_gpu,
            tensor_input=self.decoded is not None,
        )
        transforms = self.preprocessing
        datasets = image_datasets(
            self.splits, transforms.train, transforms.eval, self.decoded, self.shuffle_seed
        )
        return {split: dataset for split, dataset in datasets.items() if split in image_splits}

    def _processes(self) -> dict[str, int]:
        """Lightning's `num_replicas` and `rank` of this process; empty without a trainer."""
        trainer = getattr(self, "trainer", None)
        return (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}

    def _evaluation_samplers(self) -> dict[str, Sampler]:
        """Per evaluation split, this process's share when several processes run (none else)."""
        processes = self._processes()
        if processes.get("num_replicas", 1) <= 1:
            return {}
        return {
            split: evaluation_sampler(dataset, split, **processes)
            for split, dataset in self.datasets.items()
            if split != "train"
        }

    @property
    def device_transforms(self) -> bool:
        """Whether image batches are finished on the training device (decided in `setup`)."""
        return bool(self.preprocessing and self.preprocessing.on_device)

    @property
    def crops_on_device(self) -> bool:
        """Whether training crops are cut on the training device (decided in `setup`)."""
        return self.device_transforms and self.preprocessing.crops_on_device

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        inputs = batch[0]  # images, (canvas, boxes, flips) of device crops, or features
        if not self.device_transforms or (isinstance(inputs, torch.Tensor) and inputs.ndim == 2):
            return batch  # features need no finishing
        return self.preprocessing.finish(batch, self.trainer is not None and self.trainer.training)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            raise FinetuneError(f"Dataset {self.dataset} has no {split} split; evaluate on val.")
        if AUTO in (self.batch_size, self.eval_batch_size):
            raise FinetuneError(
                "data.batch_size=auto is chosen from the listed splits by "
                "finetune.adaptive.resolve. Fix: set the data module's batch_size to the value it "
                "chose (finetune.run.train does), or set data.batch_size."
            )
        # features are in memory: workers only add start-up
        images = split not in (self.features or {})
        dataset = self.datasets[split]
        sampler = None if train else self.evaluation_samplers.get(split)
        if train and self.sampler == BALANCED:  # several processes: each a share of its draws
            labels = [label for _, label in self.splits.train]
            sampler = BalancedSampler(labels, self.shuffle_seed, self._epoch_starting())
        if self._overfitting():
            dataset = self._mixed_order(dataset, split)
            sampler = SequentialSampler(dataset)  # Lightning keeps a sequential one as it is
        return make_loader(
            dataset,
            self.batch_size if train else self.eval_batch_size,
            train,
            num_workers=self.num_workers if images else 0,
            pin_memory=self.pin_memory and images,
            persistent_workers=self.persistent_workers and images,
            seed=self.shuffle_seed,
            collate_fn=self.preprocessing.collate_train if images and train else None,
            sampler=sampler,
            processes=self._processes().get("num_replicas", 1),
            first_epoch=self._epoch_starting() if train else 0,
        )

    def _overfitting(self) -> bool:
        """Whether the trainer overfits a few batches (`trainer.overfit_batches`, debug=overfit)
        in one process: Lightning then takes the first batches of each split in loader order."""
        trainer = getattr(self, "trainer", None)
        one_process = self._processes().get("num_replicas", 1) <= 1
        return trainer is not None and trainer.overfit_batches > 0 and one_process

    def _mixed_order(self, dataset: Dataset, split: str) -> Dataset:
        """`dataset` (the images or features of `split`) with its classes taken in turn, each
        class's images in a seeded order (`data.shuffle_seed`), the same every epoch. The splits
        list their images class by class, so the first batches of the listed order (or, by
        chance, of a plain shuffle) would hold one class, which a bias alone fits: an
        overfitting check that cannot fail. In turns, a batch holds min(batch, classes) of them."""
        labels = [label for _, label in self.splits.named()[split]]
        generator = torch.Generator().manual_seed(self.shuffle_seed)
        by_class: dict[int, list[int]] = {}
        for index in torch.randperm(len(labels), generator=generator).tolist():
            by_class.setdefault(labels[index], []).append(index)
        turns = itertools.zip_longest(*by_class.values())
        return Subset(dataset, [index for turn in turns for index in turn if index is not None])

    def _epoch_starting(self) -> int:
        """The epoch Lightning will pass to the training sampler's `set_epoch` next (its fit
        loop's processed epochs): a resumed run's, which its first iterator must already use."""
        if self.trainer is None:
            return 0
        return epochs_processed(self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
