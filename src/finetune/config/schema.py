"""The config schema: every key's type and default, in one place.

Each config group has a dataclass schema registered in Hydra's ConfigStore as `base_<option>`.
The YAML options in conf/ extend their schema (Hydra's "extending configs" pattern:
`defaults: [base_..., _self_]`) and hold only what differs. `callbacks` and `logger` stay
free-form maps of `_target_` entries.

A new key goes into the dataclass of its group, with its type, default and a comment; the YAML
option files change only when an option needs another value. Allowed values or ranges that code
elsewhere reads go into `finetune.config.values`; predict.py's and export.py's are in `commands`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from finetune.config.commands import ExportConfig, PredictConfig
from finetune.config.strategy_schema import (  # noqa: F401 - importable from here too
    STEM_PATTERNS,
    BackboneTrainsConfig,
    FullConfig,
    GradualConfig,
    LastLayerConfig,
    LpFtConfig,
    RegexConfig,
    ScratchConfig,
    StrategyConfig,
    TopKConfig,
    named_option,
)
from finetune.config.values import (
    AUTO_AUGMENT_POLICIES,
    AUTO_OR_NUMBER,
    AUTO_OR_POSITIVE_INT,
    AUTO_TRUE_FALSE,
    CLASS_WEIGHTS,
    CROP_SCALE,
    DATASETS,
    DEVICE_TRANSFORMS,
    FRACTION,
    MIN_LOADED_FRACTION,
    MODEL_SOURCES,
    PRECISIONS,
    PROBABILITY,
    PROJECT_CACHE_DIR,
    REGIMES,  # noqa: F401 - importable from here too
    RESUMABLE,
    RESUMABLE_ENTRIES,  # noqa: F401 - importable from here too
    SAMPLERS,
    SCHEDULERS,
    SELECTION_METRICS,
    one_of,
)

# ---------------------------------------------------------------------------------------------
# model


@dataclass
class ModelConfig:
    name: str = MISSING  # the architecture: torchvision or timm name, efficientnet_liteN
    source: str = field(default="torchvision", metadata=one_of(*MODEL_SOURCES))
    # DEFAULT, a weights enum name (IMAGENET1K_V1), none (random init), or a .ckpt/.pth file
    weights: str = "DEFAULT"
    # stop before training when a smaller share of the layers loaded; null = no minimum
    min_loaded_fraction: float | None = MIN_LOADED_FRACTION


# ---------------------------------------------------------------------------------------------
# data (augmentation options are packaged at data.augment)


@dataclass
class AugmentConfig:
    random_resized_crop: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0], metadata=CROP_SCALE)
    hflip: bool = True
    # strength for brightness/contrast/saturation, 0 = off
    color_jitter: float = field(default=0.0, metadata=one_of(types=(float, int), minimum=0))
    auto_augment: str = field(default="none", metadata=one_of(*AUTO_AUGMENT_POLICIES))
    random_erasing: float = field(default=0.0, metadata=PROBABILITY)  # probability, 0 = off


@dataclass
class SyntheticConfig:
    train_per_class: int = 16
    val_per_class: int = 8
    test_per_class: int = 8
    image_size: int = 96
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = field(default=MISSING, metadata=one_of(*DATASETS))
    root: str = II("paths.data_root")  # parent folder of each dataset's canonical folder
    download: bool = True  # fetch hymenoptera / flowers102 when absent
    batch_size: Any = field(default="auto", metadata=AUTO_OR_POSITIVE_INT)  # auto: adaptive
    # null = the training batch size
    eval_batch_size: Any = field(
        default=64, metadata=one_of(None, types=(int,), minimum=1) | RESUMABLE
    )
    num_workers: int = field(default=2, metadata=one_of(types=(int,), minimum=0) | RESUMABLE)
    pin_memory: bool = field(default=True, metadata=RESUMABLE)  # only takes effect with CUDA
    persistent_workers: bool = field(default=True, metadata=RESUMABLE)
    # imagefolder without val/: stratified share of each class
    val_fraction: float = field(
        default=0.2, metadata=one_of(types=(float,), above=0, below=1, example=0.2)
    )
    split_seed: int = 0
    # verified-image records and cached features; null = paths.cache_dir's default
    cache_dir: str | None = field(default=II("paths.cache_dir"), metadata=RESUMABLE)
    # decoded, resized images kept in memory; 0 = off
    decode_cache_mb: float = field(default=1024, metadata=RESUMABLE)
    # crop, flip, normalise (and erase) batches on the device: auto = on a GPU;
    # normalise = only normalise (and erase) there, crops in the loader workers
    device_transforms: Any = field(default="auto", metadata=one_of(*DEVICE_TRANSFORMS))
    # a stratified, seeded subset of the training split
    train_fraction: float = field(default=1.0, metadata=FRACTION)
    subset_seed: int = II("seed")  # which subset; a smaller fraction is part of a larger one
    shuffle_seed: int = II("seed")  # order and augmentation of training batches
    skip_corrupt: bool = False  # unreadable images: false = name them all and stop
    # loss weight per class: none, balanced (scikit-learn's) or {class: weight} (docs/data.md)
    class_weights: Any = field(default="none", metadata=CLASS_WEIGHTS)
    sampler: str = field(default="none", metadata=SAMPLERS)  # balanced: each class equally often
    # k-fold cross-validation: train and val pooled into this many stratified folds (seeded by
    # split_seed), fold `fold` validating; null = the dataset's own split
    folds: int | None = field(default=None, metadata=one_of(None, types=(int,), minimum=2))
    fold: int = field(default=0, metadata=one_of(types=(int,), minimum=0))
    # an image with more pixels is refused (Pillow's guard against decompression bombs, whose
    # default this is); null = no limit. Larger JPEGs decode at a reduced size.
    max_image_pixels: int | None = field(
        default=178_956_970, metadata=one_of(None, types=(int,), minimum=1)
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ImageFolderDataConfig(DataConfig):
    dataset: str = "imagefolder"
    root: str = MISSING  # the user's own folder (a YAML `???` cannot unset a schema default)


@dataclass
class LabelsFileConfig:
    file: str = "labels.csv"  # in data.root (or an absolute path); .tsv is tab-separated
    path_column: str = "path"  # image paths, relative to the labels file's folder
    label_column: str = "label"
    # train / val / test per row, read where the file has this column; without it, val is a
    # stratified data.val_fraction of each class
    split_column: str | None = "split"


@dataclass
class CsvDataConfig(DataConfig):
    dataset: str = "csv"
    root: str = MISSING  # the folder that holds the labels file
    labels: LabelsFileConfig = field(default_factory=LabelsFileConfig)


@dataclass
class SyntheticDataConfig(DataConfig):
    dataset: str = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# ---------------------------------------------------------------------------------------------
# optim and scheduler


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True  # the module supplies the parameter groups
    lr: Any = field(default="auto", metadata=AUTO_OR_NUMBER)  # auto: finetune.adaptive
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1.0e-4


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: Any = field(default="auto", metadata=AUTO_OR_NUMBER)  # auto: finetune.adaptive
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05


@dataclass
class OptimConfig:
    optimizer: Any = MISSING
    label_smoothing: float = 0.0
    # a block d blocks below the head learns at lr x decay^d (e.g. 0.7); null = off
    layer_decay: float | None = None


@dataclass
class SGDOptimConfig(OptimConfig):
    optimizer: SGDConfig = field(default_factory=SGDConfig)


@dataclass
class AdamWOptimConfig(OptimConfig):
    optimizer: AdamWConfig = field(default_factory=AdamWConfig)


@dataclass
class SchedulerConfig:
    name: str = field(default=MISSING, metadata=one_of(*SCHEDULERS))
    warmup_epochs: float = 0.0  # linear warmup, in epochs


ConstantSchedulerConfig = named_option("ConstantSchedulerConfig", SchedulerConfig, "constant")


@dataclass
class CosineSchedulerConfig(SchedulerConfig):
    name: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # decays to this fraction of lr


@dataclass
class StepSchedulerConfig(SchedulerConfig):
    name: str = "step"
    step_epochs: int = 7  # lr x gamma every step_epochs epochs
    gamma: float = 0.1


# ---------------------------------------------------------------------------------------------
# trainer: Lightning's Trainer arguments at its defaults (conf/trainer: the project's choices)
COUNT_OR_FRACTION = one_of(None, types=(int, float))  # int = batches, float = fraction


@dataclass
class TrainerConfig:
    accelerator: str = field(default="auto", metadata=RESUMABLE)
    strategy: str = field(default="auto", metadata=RESUMABLE)
    # a count, a list of ids, or a string ("auto", "-1", "0,1")
    devices: Any = field(default="auto", metadata=one_of(types=(int, list, str)) | RESUMABLE)
    num_nodes: int = field(default=1, metadata=RESUMABLE)
    precision: Any = field(default=None, metadata=one_of(*PRECISIONS) | RESUMABLE)
    # conf/trainer/default.yaml: auto (finetune.adaptive); null = Lightning's default. At
    # least 1: the learning-rate schedule needs its length (Lightning's -1, endless, has none)
    max_epochs: Any = field(
        default=None, metadata=one_of("auto", None, types=(int,), minimum=1) | RESUMABLE
    )
    min_epochs: int | None = None
    max_steps: int = -1
    max_time: str | None = field(default=None, metadata=RESUMABLE)  # DD:HH:MM:SS
    limit_train_batches: Any = field(default=None, metadata=COUNT_OR_FRACTION)
    limit_val_batches: Any = field(default=None, metadata=COUNT_OR_FRACTION)
    limit_test_batches: Any = field(default=None, metadata=COUNT_OR_FRACTION)
    overfit_batches: Any = field(default=0.0, metadata=one_of(types=(int, float)))
    # int = batches, float = fraction of an epoch, str = a time ("00:00:30:00")
    val_check_interval: Any = field(default=None, metadata=one_of(None, types=(int, float, str)))
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = field(default=None, metadata=RESUMABLE)
    log_every_n_steps: int | None = field(default=None, metadata=RESUMABLE)
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = field(default=None, metadata=RESUMABLE)
    enable_model_summary: bool | None = field(default=None, metadata=RESUMABLE)
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = field(
        default=None, metadata=one_of(None, "norm", "value")
    )
    deterministic: Any = field(default=None, metadata=one_of(None, True, False, "warn"))
    benchmark: bool | None = None
    fast_dev_run: Any = field(default=False, metadata=one_of(True, False, types=(int,)))
    sync_batchnorm: bool = False
    profiler: str | None = None
    detect_anomaly: bool = False


# ---------------------------------------------------------------------------------------------
# the top level


@dataclass
class PathsConfig:
    # the parent folder of the datasets (data.root of the named datasets)
    data_root: str = "${oc.env:FINETUNE_DATA_ROOT,data}"
    # the project's caches, never inside a dataset's folder ('~' is expanded where it is used);
    # resumable: they hold what can be computed again
    cache_dir: str = field(default=PROJECT_CACHE_DIR, metadata=RESUMABLE)


@dataclass
class SpeedConfig:
    # NHWC layout for images and convolutions; auto = on for conv nets
    channels_last: Any = field(default="auto", metadata=one_of(*AUTO_TRUE_FALSE) | RESUMABLE)
    # torch.compile the network: slower first steps, faster after
    compile: bool = field(default=False, metadata=RESUMABLE)


@dataclass
class SelectionConfig:  # what picks the best checkpoint and epoch, the probe's L2 (values.py)
    metric: str = field(default="val/acc", metadata=one_of(*SELECTION_METRICS) | RESUMABLE)


@dataclass
class Config:
    # the groups: each option brings its own schema
    model: Any = MISSING
    strategy: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = MISSING
    trainer: Any = MISSING
    callbacks: Any = field(default_factory=dict)  # free-form: name -> _target_ entry or null
    logger: Any = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 42
    # everything a run writes goes here (Hydra's run dir; `hydra.run.dir=DIR` moves it)
    run_dir: str = II("hydra:runtime.output_dir")
    # resume: `last` (the last checkpoint of hydra.run.dir), a run dir, or a .ckpt file
    ckpt_path: str | None = None
    print_config: bool = field(default=False, metadata=RESUMABLE)  # true: the whole tree
    # debug=fast: each split cut to the images its trainer.limit_<split>_batches (a count)
    # reach, so the probe's features and the decode cache cover only those (finetune.smoke)
    smoke_test: bool = False
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"base_model": ModelConfig},
    "strategy": {
        "base_last_layer": LastLayerConfig,
        "base_top_k": TopKConfig,
        "base_regex": RegexConfig,
        "base_gradual": GradualConfig,
        "base_full": FullConfig,
        "base_lp_ft": LpFtConfig,
        "base_scratch": ScratchConfig,
    },
    "data": {
        "base_data": DataConfig,
        "base_imagefolder": ImageFolderDataConfig,
        "base_csv": CsvDataConfig,
        "base_synthetic": SyntheticDataConfig,
    },
    "optim": {"base_sgd": SGDOptimConfig, "base_adamw": AdamWOptimConfig},
    "scheduler": {
        "base_constant": ConstantSchedulerConfig,
        "base_cosine": CosineSchedulerConfig,
        "base_step": StepSchedulerConfig,
    },
    "trainer": {"base_trainer": TrainerConfig},
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent): `base_config` for config.yaml and
    `<group>/base_<option>` for the option files."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    store.store(name="base_predict", node=PredictConfig)
    store.store(name="base_export", node=ExportConfig)
    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=group, name=name, node=schema)
