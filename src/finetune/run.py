"""The one training flow: config -> data + model -> trainer -> fit -> evaluation -> run dir.

`train(cfg)` reads as the list of its steps; each step is a function below it. Process setup is
in `finetune.runtime`, the callbacks in `finetune.callbacks`, and every file of the run dir is
written by `finetune.rundir`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.callbacks import ProgressBar as LightningProgressBar

from finetune import (
    adaptive,
    backbones,
    callbacks,
    config,
    distributed,
    features,
    imbalance,
    interrupt,
    probe,
    resume,
    rundir,
    runtime,
    smoke,
    strategies,
)
from finetune.backbones import Network
from finetune.data import FinetuneDataModule, feature_datasets
from finetune.distributed import build_once
from finetune.errors import FinetuneError
from finetune.module import ClassifierModule, countable_example
from finetune.reports import EvaluationReport, best_checkpoint_line, warn_partial_evaluations
from finetune.strategies import count_parameters
from finetune.transforms import is_augmenting

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment end to end and return what it writes to `metrics.json`.

    Raises `FinetuneError` (one message naming the key or file and the fix) for bad input
    found before or during the run; the run dir then holds no metrics.json. A resume in place
    (`ckpt_path=last`) rewrites none of the run's files; one that stops before training raises
    `ResumeRefused` and leaves the run dir as it was. Ctrl-C during training raises
    `KeyboardInterrupt` once Lightning has shut down.
    """
    run_started = time.perf_counter()
    config.validate(cfg)  # train.py checked it; a config built in code is checked here
    run_dir = runtime.prepare(cfg)
    resuming = resume.ResumePlan.of(cfg, run_dir)  # refuses what its checkpoint cannot follow
    with resuming.kept_as_it_was():
        if not resuming.in_place:
            rundir.save_config(cfg, run_dir)
        datamodule = build_data(cfg, run_dir, write=not resuming.in_place)
        processes = distributed.world_size(cfg.trainer)
        planned = strategies.plan(cfg)
        cfg, chosen = adaptive.resolve(  # every `auto` key from the data; config.yaml keeps it
            cfg,
            datamodule.splits.sizes()["train"],
            datamodule.num_classes,
            planned.regime,
            augmenting=is_augmenting(cfg.data.get("augment") or {}),
            batches_per_step=processes * int(cfg.trainer.get("accumulate_grad_batches") or 1),
        )
        datamodule.batch_size = cfg.data.batch_size  # the loaders take the resolved batch
        resuming.verify(cfg, chosen, datamodule, planned.regime)
        solves = planned.strategy.head_from_probe and not resuming.restores_head
        smoke_test = smoke.cut_splits(cfg, datamodule, processes, probe=solves)  # debug=fast
        model = build_model(cfg, datamodule, planned)
    fitting = build_trainer(cfg, model, datamodule)
    check_world_size(fitting.trainer, processes, chosen)
    if not resuming.in_place:  # the report of the weights the run started from
        rundir.save_weights_report(run_dir, model.network.load_report, fitting.loggers)
    fit_seconds, feature_report = fit(fitting, model, datamodule, resuming)
    # Described before the evaluation: validating a checkpoint restores every callback's state
    # from it, and the epoch timer of an earlier best epoch lists only the epochs before it.
    described = describe_run(cfg, model, datamodule, fitting, fit_seconds)
    earlier_seconds = fitting.epoch_timer.earlier_fit_seconds  # a resume's earlier processes
    with interrupt.ctrl_c_as_interrupt(fitting.trainer):
        metrics = evaluate_best_checkpoint(fitting.trainer, model.module, datamodule)
    metrics |= described | smoke_test | feature_report  # a smoke test's split_sizes: whole
    metrics |= model.strategy.probe_report
    metrics |= fitting.evaluation_report.results | adaptive.metrics_entry(chosen)
    # Everything of train() but writing the results: what the benchmarks call work seconds;
    # after a resume, with the fit of the processes before it (as fit_seconds counts them).
    run_seconds = time.perf_counter() - run_started + earlier_seconds
    metrics["run_seconds"] = round(run_seconds, 2)
    rundir.save_results(run_dir, metrics, cfg, fitting.loggers, fitting.trainer.global_step)
    rundir.save_classification_report(run_dir, fitting.evaluation_report.classification_text())
    if fitting.trainer.is_global_zero:  # one closing line, not one per process
        warn_partial_evaluations(metrics)
        log.info("%s Run dir: %s", best_checkpoint_line(metrics), run_dir)
    return metrics


def check_world_size(trainer: pl.Trainer, processes: int, chosen: dict[str, Any]) -> None:
    """`FinetuneError` when the rules chose the batch or the learning rate for another number
    of processes than the trainer runs (a launcher that starts more or fewer ranks than
    trainer.devices x trainer.num_nodes says)."""
    ruled = [key for key in ("data.batch_size", "optim.optimizer.lr") if key in chosen]
    if ruled and trainer.world_size != processes:
        raise FinetuneError(
            f"The trainer runs {trainer.world_size} processes, but trainer.devices x "
            f"trainer.num_nodes say {processes}, and {' and '.join(ruled)} were chosen for "
            f"{processes}. Fix: set trainer.devices and trainer.num_nodes to what the launcher "
            "starts (srun --ntasks-per-node, torchrun --nproc-per-node), or set "
            f"{' '.join(f'{key}=...' for key in ruled)} yourself."
        )


class Model(NamedTuple):
    strategy: strategies.FreezeStrategy
    network: Network  # backbone + new head
    module: ClassifierModule
    speed: dict[str, bool]  # runtime.speed_switches: channels_last, compile
    # the probe is solved on the clean training images and this many augmented views of each
    augmented_views: int
    selection: str = "val/acc"  # selection.metric: what chooses the probe's L2 on val


class Fitting(NamedTuple):
    trainer: pl.Trainer
    loggers: list[Any]
    epoch_timer: callbacks.EpochTimer
    evaluation_report: EvaluationReport


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def build_datamodule(cfg: DictConfig) -> FinetuneDataModule:
    """The data module of a composed config. The preprocessing belongs to the weights: the
    backbone's input spec drives the data transforms, not the data config."""
    return FinetuneDataModule(input_spec=backbones.input_spec(cfg.model), **_plain(cfg.data))


def build_data(cfg: DictConfig, run_dir: Path, write: bool = True) -> FinetuneDataModule:
    """The prepared data module; classes.json, split.json (and skipped_images.json) in the run
    dir when `write` (a resume in place keeps the run's own: the checkpoint must match them)."""
    datamodule = build_datamodule(cfg)
    # One builder per data root at a time; a user's image folder is never created by the lock.
    with build_once(datamodule.cache_dir, "prepare", create=not datamodule.reads_user_folder):
        datamodule.prepare_data()  # a missing dataset stops the run here, before any training
    data = cfg.data
    imbalance.log_class_balance(
        datamodule.splits, data.get("class_weights"), data.get("sampler"), data.get("folds")
    )
    if write:
        rundir.save_classes(run_dir, datamodule.class_names, datamodule.skipped)
        rundir.save_split(run_dir, datamodule.split_record())
    return datamodule


def build_model(
    cfg: DictConfig, datamodule: FinetuneDataModule, planned: strategies.StrategyPlan | None = None
) -> Model:
    """The freeze strategy, the network with a head for the data's classes, the module.
    `planned`: the run's strategy plan (`strategies.plan(cfg)` when not given)."""
    strategy, caches_features, _ = planned or strategies.plan(cfg)
    network = backbones.build(
        cfg.model, num_classes=datamodule.num_classes, pretrained=strategy.pretrained
    )
    strategy.init_head(network)
    speed = runtime.speed_switches(cfg, network)
    module = ClassifierModule(
        class_names=datamodule.class_names,
        model=_plain(cfg.model),
        optim=_plain(cfg.optim),
        scheduler=_plain(cfg.scheduler),
        backbone_lr_scale=strategy.backbone_lr_scale,
        network=network,
        inputs_are_features=caches_features,
        channels_last=speed["channels_last"],
        # the solved probe on cached features is the whole training: epochs only measure it
        head_solved=caches_features and strategy.head_from_probe,
        class_weight=datamodule.class_weight,
    )
    if speed["compile"] and not caches_features:  # cached features: the head alone, too small
        network.net.compile()
        # the model summary's example forward would compile a graph for batch 1 first
        module.example_input_array = None
    elif cfg.trainer.get("enable_model_summary") is not False:
        module.example_input_array = countable_example(module)
    views = int(cfg.strategy.get("augmented_views") or 0)  # adaptive.resolve checked it
    return Model(strategy, network, module, speed, views, cfg.selection.metric)


def build_trainer(cfg: DictConfig, model: Model, datamodule: FinetuneDataModule) -> Fitting:
    """The Trainer with the strategy, the run's own callbacks and the config's callbacks and
    loggers; checkpoints are written atomically."""
    epoch_timer = callbacks.EpochTimer()
    evaluation_report = EvaluationReport(
        datamodule.class_names,
        {"val": datamodule.splits.val, "test": datamodule.splits.test},
    )
    options, config_callbacks = trainer_options(
        cfg, callbacks.instantiate_all(cfg.get("callbacks"))
    )
    run_callbacks = [
        model.strategy,
        epoch_timer,
        evaluation_report,
        resume.RandomState(),
        resume.ResumedDataOrder(),
        *config_callbacks,
    ]
    loggers = callbacks.instantiate_all(cfg.get("logger"))
    trainer = pl.Trainer(
        **options,
        callbacks=run_callbacks,
        logger=loggers or False,
        plugins=[resume.AtomicCheckpointIO()],
    )
    return Fitting(trainer, loggers, epoch_timer, evaluation_report)


def trainer_options(cfg: DictConfig, config_callbacks: list[Any]) -> tuple[dict, list]:
    """The Trainer's keyword arguments (`cfg.trainer`) and the config's callbacks, agreeing on
    the progress bar: an unset `trainer.enable_progress_bar` follows the callbacks group
    (`callbacks.progress_bar=null`: no bar, where Lightning would add its own), and
    `trainer.enable_progress_bar=false` drops the group's bar (which Lightning refuses beside
    it); `=true` without one in the group shows Lightning's own."""
    options = _plain(cfg.trainer)
    bars = [c for c in config_callbacks if isinstance(c, LightningProgressBar)]
    if options.get("enable_progress_bar") is None:
        options["enable_progress_bar"] = bool(bars)
    elif not options["enable_progress_bar"]:
        config_callbacks = [c for c in config_callbacks if c not in bars]
    return options, config_callbacks


def training_data(
    model: Model,
    datamodule: FinetuneDataModule,
    trainer: pl.Trainer,
    resuming: resume.ResumePlan,
) -> dict[str, Any]:
    """Extract the frozen backbone's features of the training and validation splits once (or
    reuse them) when the head trains on them or starts from the linear probe; solve that probe
    into the head (unless `resuming` restores it), with `model`'s augmented
    views of the training images (drawn from `data.shuffle_seed`, as training augments);
    serve the features the fit uses. The test split stays images: it is evaluated once, after
    fit, and its forward pass there costs what an extraction would. Returns the feature-cache
    and probe part of metrics.json."""
    # A resumed lp_ft needs none: the checkpoint holds the solved head and the probe's report,
    # and the fit trains on images (the features were only the probe's).
    resumed_on_images = resuming.restores_head and not model.module.inputs_are_features
    if resumed_on_images or not (
        model.module.inputs_are_features or model.strategy.head_from_probe
    ):
        return {"feature_cache": "off", "splits_served_as_features": []}
    with build_once(datamodule.cache_dir, "features"):  # extracted once, read by the rest
        extracted, report = features.cached_features(
            datamodule,
            model.network,
            trainer,
            channels_last=model.speed["channels_last"],
            only=("train", "val"),
        )
        views, views_report = None, {}
        if model.augmented_views > 0 and not resuming.restores_head:
            views, views_report = features.augmented_views(
                datamodule,
                model.network,
                trainer,
                model.augmented_views,
                datamodule.shuffle_seed,
                channels_last=model.speed["channels_last"],
            )
    if model.strategy.head_from_probe and not resuming.restores_head:  # and the probe's report
        device = trainer.strategy.root_device
        solved = solve_probe(
            model.network,
            datamodule,
            extracted,
            device,
            views,
            model.module.criterion,
            model.selection,
        )
        # the views' cache goes with the probe's report, which a resume restores
        views_cache = {k.replace("feature_", "views_"): v for k, v in views_report.items()}
        model.strategy.probe_report = solved | views_cache
    # lp_ft and strategy.cache_features=false train on images after the solve
    served = list(extracted) if model.module.inputs_are_features else []
    if served:
        datamodule.use_features(extracted)
    return report | {"splits_served_as_features": sorted(served)}


def solve_probe(
    network: Network,
    datamodule: FinetuneDataModule,
    extracted: dict[str, torch.Tensor],
    device: torch.device,
    views: torch.Tensor | None,
    loss: probe.HeadLoss,
    selection: str = "val/acc",
) -> dict[str, Any]:
    """Solve the linear probe on the training split's features and `views` (augmented views of
    the training images, view-major: `features.augmented_views`), L2 chosen on val by
    `selection` (`selection.metric`), on `device`, with the training `loss` (class weights as
    the sampler weighs them: `solved_class_weight`), into the network's head; returns its report
    for metrics.json."""
    # The features with their labels, as the data module would serve them.
    splits = feature_datasets(datamodule.splits, extracted)
    train, val = splits["train"], splits.get("val")
    train_features, train_labels = train.features, train.labels
    view_count = 0 if views is None else len(views) // len(train_labels)
    if views is not None and len(views) != view_count * len(train_labels):
        raise FinetuneError(
            f"{len(views)} augmented-view features for {len(train_labels)} training images. "
            f"Fix: delete the feature cache under {datamodule.cache_dir / 'features'}."
        )
    if view_count:
        train_features = torch.cat([train_features, views])
        train_labels = train_labels.repeat(view_count + 1)
    solution = probe.solve(
        train_features.to(device),
        train_labels.to(device),
        datamodule.num_classes,
        None if val is None else val.features.to(device),
        None if val is None else val.labels.to(device),
        label_smoothing=loss.label_smoothing,
        class_weight=datamodule.solved_class_weight(loss.class_weight),
        selection=selection,
    )
    solution.copy_into(network.get_classifier())
    return solution.report() | {"probe_augmented_views": view_count}


def fit(
    fitting: Fitting, model: Model, datamodule: FinetuneDataModule, resuming: resume.ResumePlan
) -> tuple[float, dict[str, Any]]:
    """Train (from the checkpoint `resuming` continues, if any). Returns the seconds it took,
    feature extraction and the probe's solve included (after a resume: with the seconds of
    the processes before it, up to the checkpoint, as the uninterrupted run counts them), and
    the feature extraction's part of metrics.json (after a resume: the first process's)."""
    trainer = fitting.trainer
    fitting.epoch_timer.start_fit()
    feature_report = training_data(model, datamodule, trainer, resuming)
    if not resuming.restores_head:  # a resume restores the first process's from the checkpoint
        model.strategy.feature_report = feature_report
    with interrupt.ctrl_c_as_interrupt(trainer), warnings.catch_warnings():
        for message in resuming.silenced_warnings:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(model.module, datamodule=datamodule, ckpt_path=resuming.checkpoint)
    # a checkpoint of an older version has none: this process's report then
    return fitting.epoch_timer.fit_seconds(), model.strategy.feature_report or feature_report


def evaluate_best_checkpoint(
    trainer: pl.Trainer,
    module: ClassifierModule,
    datamodule: FinetuneDataModule,
) -> dict[str, Any]:
    """Validation (and test, when the data has a test split) metrics of the best checkpoint by
    the monitored metric, else of the latest one, else of the weights in memory; and
    `best_checkpoint`, its path ("" without checkpoints), and `best_epoch`, its epoch (counted
    from 0, as in checkpoint names; the last epoch trained without checkpoints; -1 for the
    linear probe kept before the first training step, see `FreezeStrategy.on_train_start`).

    The validation is logged under `best/val/*`, so the `val/*` curves keep one point per
    epoch; the keys returned are `val/*` (and `test/*`).
    """
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    ranked = [c.best_model_path for c in checkpoints if c.monitor and c.best_model_path]
    best = (ranked or [c.best_model_path for c in checkpoints if c.best_model_path] or [""])[0]
    evaluate_from = best or None
    metrics = _stage_metrics(
        trainer.validate(module, datamodule=datamodule, ckpt_path=evaluate_from, verbose=False)
    )
    if datamodule.has_test_split:
        metrics |= _stage_metrics(
            trainer.test(module, datamodule=datamodule, ckpt_path=evaluate_from, verbose=False)
        )
    epoch = max(trainer.current_epoch - 1, 0)
    if best:
        saved = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
        # saved before the first training step: the linear probe the head started from
        epoch = int(saved["epoch"]) if saved["global_step"] > 0 else -1
    return metrics | {"best_checkpoint": best, "best_epoch": epoch}


def _stage_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    if not results:
        return {}
    return {
        name.removeprefix(ClassifierModule.EVALUATION_TAG): float(value)
        for name, value in results[0].items()
    }


def describe_run(
    cfg: DictConfig,
    model: Model,
    datamodule: FinetuneDataModule,
    fitting: Fitting,
    fit_seconds: float,
) -> dict[str, Any]:
    """The part of metrics.json that says what ran: sizes, names, timings, weights loaded."""
    counts = count_parameters(model.network)
    report = model.network.load_report
    return {
        "epochs": fitting.trainer.current_epoch,
        "fit_seconds": round(fit_seconds, 2),
        "train_epoch_seconds": list(fitting.epoch_timer.seconds),
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "model": cfg.model.name,
        "weights": model.network.weights,
        "strategy": cfg.strategy.name,
        "data": cfg.data.dataset,
        "num_classes": datamodule.num_classes,
        "split_sizes": datamodule.splits.sizes(),
        "skipped_images": len(datamodule.skipped),
        "seed": cfg.seed,
        "selection_metric": cfg.selection.metric,
        **(report.counts() if report else {}),
    }
