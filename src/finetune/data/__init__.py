"""The data package: one concern per module.

- `images`: `load_rgb`, THE one decode function (file -> RGB), and the decode-once cache.
- `layouts`: hymenoptera, flowers102, imagefolder, synthetic: fetch the files, build the splits.
- `loading`: `DatasetSplits`, datasets, the seeded `EpochSampler`, `make_loader`, splits, subsets.
- `verify`: unreadable files, found once per exact file list.
- `balance`: class imbalance: the loss's weight per class and the balanced training sampler.
- `module`: `FinetuneDataModule`, the one LightningDataModule (images or cached features).
"""

from finetune.data.images import DecodedImages, load_rgb, to_rgb
from finetune.data.layouts import LAYOUTS, LayoutOptions
from finetune.data.loading import (
    DatasetSplits,
    EpochSampler,
    FeatureDataset,
    ImageListDataset,
    Sample,
    feature_datasets,
    make_loader,
    stratified_split,
    training_subset,
)
from finetune.data.module import FinetuneDataModule
from finetune.data.verify import files_fingerprint, find_unreadable

__all__ = [
    "LAYOUTS",
    "DatasetSplits",
    "DecodedImages",
    "EpochSampler",
    "FeatureDataset",
    "FinetuneDataModule",
    "ImageListDataset",
    "LayoutOptions",
    "Sample",
    "feature_datasets",
    "files_fingerprint",
    "find_unreadable",
    "load_rgb",
    "make_loader",
    "stratified_split",
    "to_rgb",
    "training_subset",
]
