"""The one training flow: config -> data + model -> trainer -> run dir.

seed -> data module (downloads or generates, finds the classes) -> backbone with a new head
-> LightningModule -> callbacks, strategy, TensorBoard -> fit -> evaluate the best
checkpoint -> metrics.json, classes.json, config.yaml and events in the run dir.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from finetune import backbones, features, resume, strategies
from finetune.data import FinetuneDataModule
from finetune.distributed import build_once
from finetune.errors import FinetuneError
from finetune.module import ClassifierModule
from finetune.reports import EvaluationReport
from finetune.strategies import count_parameters
from finetune.transforms import is_augmenting

log = logging.getLogger(__name__)

# Frozen parts of the network are in eval mode on purpose (see strategies.py).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def print_config_tree(cfg: DictConfig) -> None:
    """Print the resolved config as a tree, one branch per config group."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config")
    for key, value in cfg.items():
        branch = tree.add(str(key))
        text = OmegaConf.to_yaml(value) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def write_json(path: Path, payload: Any) -> None:
    """Write then rename, so a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def _instantiate_all(group_cfg: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a callbacks/logger group; a null entry switches it off."""
    if not group_cfg:
        return []
    return [instantiate(entry) for entry in group_cfg.values() if entry is not None]


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def _stage_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(value) for name, value in results[0].items()} if results else {}


class EpochTimer(pl.Callback):
    """Seconds of each training epoch, for metrics.json and the benchmarks. Lightning runs the
    epoch's validation inside the training epoch; its time is subtracted."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0
        self._validation_started = 0.0
        self._validation_seconds = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._validation_seconds = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_seconds += time.perf_counter() - self._validation_started

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - self._started - self._validation_seconds
        self.seconds.append(round(elapsed, 3))


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading the logged numbers (the training loss) every
    `metrics_every` training batches and at the epoch's last one, not after every batch. Each
    read copies a value back from the GPU: the CPU waits for the step to finish and the GPU
    then idles until the next step is queued. The bar itself still moves every batch."""

    def __init__(self, metrics_every: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_every = max(int(metrics_every), 1)
        self._read_now = True
        self._shown: dict[str, Any] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        done = batch_idx + 1
        self._read_now = done % self.metrics_every == 0 or done >= trainer.num_training_batches
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._read_now = True  # validation and epoch ends read as usual

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        if self._read_now or not self._shown:
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown


def _speed_switches(cfg: DictConfig, network: torch.nn.Module) -> dict[str, bool]:
    """`speed.channels_last` and `speed.compile` as plain booleans.

    channels_last `auto` means on for convolutional networks: NHWC convolutions were 20-25%
    faster per training step on this project's CPU (efficientnet_lite0, mobilenet_v2,
    resnet50) and are the fast path of cuDNN with mixed precision; a vision transformer
    (a single patch-embedding convolution) stays as it is.
    """
    speed = cfg.get("speed") or {}
    channels_last = speed.get("channels_last", "auto")
    if channels_last == "auto":
        convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in network.modules())
        channels_last = convolutions >= 5
    return {"channels_last": bool(channels_last), "compile": bool(speed.get("compile", False))}


def _require_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise FinetuneError(
            f"Cannot write the run dir {run_dir} ({error.strerror}). Fix: choose a writable "
            "folder with hydra.run.dir=..., or free space on that disk."
        ) from error


def _check_devices(trainer_cfg: DictConfig) -> None:
    """`trainer.devices` as a count must not exceed what the machine has."""
    devices, accelerator = trainer_cfg.get("devices", 1), str(trainer_cfg.get("accelerator"))
    if not isinstance(devices, int) or devices < 1:
        return  # "auto", -1 or a list of ids: Lightning resolves and checks those
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0):
        available, kind = gpus, "GPU"
    elif accelerator in ("cpu", "auto"):
        available, kind = os.cpu_count() or 1, "CPU core"
    else:
        return
    if devices > available:
        raise FinetuneError(
            f"trainer.devices={devices} with trainer.accelerator={accelerator}, but this machine "
            f"has {available} {kind}(s). Fix: trainer.devices={max(available, 1)} or fewer"
            + (", or trainer=cpu to train on the CPU." if kind == "GPU" else ".")
        )


def keep_freed_memory_in_process() -> None:
    """Stop glibc from returning large tensor buffers to the OS after every use.

    By default glibc serves each allocation above its mmap threshold (at most 32 MB) from a
    fresh mmap and unmaps it on free, so every training step page-faults gigabytes of zeroed
    memory: on a 2-core CPU that was a third of the time of an EfficientNet step and made whole
    epochs stall. Serving everything from the heap and never trimming it keeps the memory in the
    process (a somewhat higher resident size) and removes the faults.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)


def build_datamodule(cfg: DictConfig) -> FinetuneDataModule:
    """The data module of a composed config. The preprocessing belongs to the weights: the
    backbone's input spec drives the data transforms, not the data config."""
    return FinetuneDataModule(input_spec=backbones.input_spec(cfg.model), **_plain(cfg.data))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment end to end and return what it writes to `metrics.json`."""
    run_started = time.perf_counter()
    keep_freed_memory_in_process()
    run_dir = Path(cfg.run_dir)
    _require_writable(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    # With several devices Lightning re-runs this script once per extra rank; only rank 0
    # writes files (the other ranks start after rank 0 has prepared the data).
    is_rank_zero = rank_zero_only.rank == 0
    if is_rank_zero:
        if cfg.get("print_config", True):
            print_config_tree(cfg)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    datamodule = build_datamodule(cfg)
    # One builder per data root at a time; a user's image folder is never created by the lock.
    with build_once(datamodule.cache_dir, "prepare", create=cfg.data.dataset != "imagefolder"):
        datamodule.prepare_data()  # a missing dataset stops the run here, before any training
    if is_rank_zero:
        write_json(run_dir / "classes.json", datamodule.class_names)
        if datamodule.skipped:
            write_json(run_dir / "skipped_images.json", datamodule.skipped)
    resume_from = resume.resolve_checkpoint(cfg.get("ckpt_path"), run_dir)
    if resume_from:
        resume.check_compatible(resume_from, datamodule.class_names, cfg.model.name)

    strategy = strategies.build(_plain(cfg.strategy))
    backbone = backbones.build(
        cfg.model, num_classes=datamodule.num_classes, pretrained=strategy.pretrained
    )
    module = ClassifierModule(
        backbone,
        class_names=datamodule.class_names,
        model=_plain(cfg.model),
        optim=_plain(cfg.optim),
        scheduler=_plain(cfg.scheduler),
        backbone_lr_scale=strategy.backbone_lr_scale,
    )

    epoch_timer = EpochTimer()
    evaluation_report = EvaluationReport(
        datamodule.class_names,
        {"val": datamodule.splits.val, "test": datamodule.splits.test},
    )
    callbacks = [
        strategy,
        epoch_timer,
        evaluation_report,
        resume.RandomState(),
        *_instantiate_all(cfg.get("callbacks")),
    ]
    loggers = _instantiate_all(cfg.get("logger"))
    _check_devices(cfg.trainer)
    trainer = pl.Trainer(
        **_plain(cfg.trainer),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[resume.AtomicCheckpointIO()],
    )
    if backbone.load_report is not None and trainer.is_global_zero:
        write_json(run_dir / "weights_report.json", backbone.load_report.to_dict())
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                table = str(backbone.load_report).replace("\n", "  \n")  # markdown line breaks
                logger.experiment.add_text("weights/load_report", table)

    speed = _speed_switches(cfg, backbone)
    if speed["channels_last"]:
        module.to(memory_format=torch.channels_last)
        module.channels_last = True

    started = time.perf_counter()
    # A frozen backbone without augmentation sees the same images every epoch: compute its
    # features once (or reuse them) and train the head on those.
    train_data: pl.LightningDataModule = datamodule
    feature_report: dict[str, Any] = {"feature_cache": "off"}
    if strategy.caches_features(augmenting=is_augmenting(cfg.data.get("augment") or {})):
        with build_once(datamodule.cache_dir, "features"):  # extracted once, read by the rest
            train_data, feature_report = features.cached_features(
                datamodule,
                backbone,
                device=trainer.strategy.root_device,
                precision=str(cfg.trainer.get("precision", "32")),
                channels_last=speed["channels_last"],
            )
        module.inputs_are_features = True
    elif speed["compile"]:
        module.backbone.net.compile()

    trainer.fit(module, datamodule=train_data, ckpt_path=resume_from)
    fit_seconds = time.perf_counter() - started

    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    # The best checkpoint by the monitored metric; without one, the latest checkpoint.
    ranked = [c.best_model_path for c in checkpoints if c.monitor and c.best_model_path]
    best = (ranked or [c.best_model_path for c in checkpoints if c.best_model_path] or [""])[0]
    evaluate_from = best or None  # without checkpoints, evaluate the weights in memory
    metrics: dict[str, Any] = _stage_metrics(
        trainer.validate(module, datamodule=train_data, ckpt_path=evaluate_from, verbose=False)
    )
    if datamodule.has_test_split:
        metrics |= _stage_metrics(
            trainer.test(module, datamodule=train_data, ckpt_path=evaluate_from, verbose=False)
        )

    counts = count_parameters(module.backbone)
    report = backbone.load_report
    metrics |= {
        "best_checkpoint": best,
        "epochs": trainer.current_epoch,
        "fit_seconds": round(fit_seconds, 2),
        "train_epoch_seconds": epoch_timer.seconds,
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "model": cfg.model.name,
        "weights": backbone.weights,
        "strategy": cfg.strategy.name,
        "data": cfg.data.dataset,
        "num_classes": datamodule.num_classes,
        "split_sizes": datamodule.splits.sizes(),
        "skipped_images": len(datamodule.skipped),
        "seed": cfg.seed,
        **feature_report,
        **(report.counts() if report else {}),
        **evaluation_report.results,
    }
    # Everything of train() but writing the results: what the benchmarks call work seconds.
    metrics["run_seconds"] = round(time.perf_counter() - run_started, 2)
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        _log_final_hparams(loggers, cfg, metrics)
    log.info("Run finished: %s", run_dir)
    return metrics


# The config that defines an experiment's result (not where its files go or how it is shown).
HPARAM_GROUPS = ("model", "strategy", "data", "optim", "scheduler", "trainer", "seed")


def _log_final_hparams(loggers: list[Any], cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Record the whole config with the final numbers, so TensorBoard's hparams tab compares
    runs of a sweep by their results (not by a placeholder hp_metric)."""
    experiment = {key: cfg[key] for key in HPARAM_GROUPS if key in cfg}
    params = {
        key: str(value) if isinstance(value, list | tuple) or value is None else value
        for key, value in _flatten(OmegaConf.to_container(OmegaConf.create(experiment))).items()
    }
    final = {
        f"final/{name.replace('/', '_')}": value
        for name, value in metrics.items()
        if isinstance(value, float) and "/" in name
    }
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final)
        else:
            logger.log_hyperparams(params)
        logger.save()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat
