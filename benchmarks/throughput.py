"""Training throughput (images/s) with bf16-mixed and channels_last: the model alone on a
synthetic batch already on the device, the data pipeline alone (the project's loader, batches
moved to the device and finished there; on a GPU both with the crops made there, the default,
and in the loader workers), and the project's whole pipeline (train.py: decoding, augmentation,
loading, Lightning, the model).

    python benchmarks/throughput.py [--models mobilenet_v2 resnet50] [--train-images 16384]

Runs on the GPU when there is one, on the CPU otherwise (with few steps: a CPU trains a few
images per second). The images are the real hymenoptera photos; on a GPU the training split
links each of them many times (`--train-images`), so that an epoch lasts seconds and the
figure is not an epoch-boundary effect. Weights are random (model.weights=none): speed does not
depend on them. The GPU target: the whole pipeline reaches >= 90% of model-only throughput.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import move_data_to_device

import finetune.config  # noqa: F401  registers the schema that conf/ extends
from common import DATA_ROOT, REPO, emit, ratio, train_py
from finetune import backbones
from finetune.optim import build_optimizer
from finetune.run import build_datamodule


def composed(overrides: list[str]) -> DictConfig:
    """The project's config with `overrides`, as train.py would compose it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def model_only(cfg: DictConfig, device: torch.device, batch_size: int, steps: int, precision: str):
    """Training steps of the bare network on one synthetic batch resident on the device, with
    the optimizer and parameter groups train.py builds from the same config."""
    net = backbones.build(cfg.model, 2, False)
    net = net.to(device, memory_format=torch.channels_last).train()
    optim, schedule = (OmegaConf.to_container(c, resolve=True) for c in (cfg.optim, cfg.scheduler))
    optimizer, _ = build_optimizer(net, optim, schedule, total_steps=steps, steps_per_epoch=steps)
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    # Lightning's own mixed-precision context for this precision, as the trainer would use it.
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False)
    forward_context = trainer.precision_plugin.forward_context

    def step() -> None:
        with forward_context():
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(steps * batch_size / (time.perf_counter() - started), 1)


def linked_hymenoptera(source: Path, train_images: int, folder: Path) -> Path:
    """An image folder of the real hymenoptera photos: train/ links each training photo as
    often as needed to hold at least `train_images` files, val/ links the val photos once."""
    real = source / "hymenoptera_data"
    for split in ("train", "val"):
        photos = sorted(p for p in (real / split).glob("*/*") if p.is_file())
        copies = max(1, math.ceil(train_images / len(photos))) if split == "train" else 1
        for photo in photos:
            target = folder / split / photo.parent.name
            target.mkdir(parents=True, exist_ok=True)
            for copy in range(copies):
                (target / f"{copy}_{photo.name}").symlink_to(photo.resolve())
    return folder


def loader_only(cfg: DictConfig, device: torch.device, epochs: int) -> float:
    """Images/s the project's training loader delivers, finished on the device as in training
    (no model); the first epoch (worker start-up) is left out."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    seconds = []
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for batch in loader:
            batch = move_data_to_device(batch, device)
            batch = datamodule.on_after_batch_transfer(batch, 0)
            images += len(batch[1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - started) / images)
    return round(1 / statistics.median(seconds[1:] or seconds), 1)


def main() -> None:
    on_gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=64 if on_gpu else 16)
    parser.add_argument("--steps", type=int, default=50 if on_gpu else 5)
    parser.add_argument("--epochs", type=int, default=4 if on_gpu else 2)
    parser.add_argument("--train-images", type=int, default=16384 if on_gpu else 0)
    # Leave two cores to the training process and its pin-memory thread.
    parser.add_argument(
        "--num-workers", type=int, default=min(12, cores - 2) if on_gpu else min(2, cores)
    )
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    args = parser.parse_args()
    device = torch.device("cuda" if on_gpu else "cpu")
    where = torch.cuda.get_device_name() if on_gpu else f"cpu x{cores}"

    with tempfile.TemporaryDirectory() as scratch:
        folder = linked_hymenoptera(args.data_root, args.train_images, Path(scratch) / "photos")
        data = [
            "data=imagefolder",
            f"data.root={folder}",
            f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.num_workers}",
            # Every linked photo decoded once: 16384 of them take about 4.5 GB.
            "data.decode_cache_mb=8192",
        ]
        for name in args.models:
            model = [f"model={name}", "model.weights=none"]
            alone = model_only(composed(model), device, args.batch_size, args.steps, args.precision)
            # As training on this device does it (a GPU: crops on the GPU); on a GPU also
            # with the crops in the loader workers, the other choice of data.device_transforms.
            variants = {"": "true", "_worker_crops": "normalise"} if on_gpu else {"": "auto"}
            loader = {
                suffix: loader_only(
                    composed([*model, *data, f"data.device_transforms={option}"]),
                    device,
                    epochs=args.epochs if on_gpu else 3,
                )
                for suffix, option in variants.items()
            }
            overrides = [
                *model,
                "strategy=full",
                "strategy.bn=train",
                *data,
                f"trainer.precision={args.precision}",
                f"trainer.max_epochs={args.epochs}",
                "speed.channels_last=true",
                "callbacks.model_checkpoint=null",
                "callbacks.last_checkpoint=null",
            ]
            if not on_gpu:  # a few steps are enough to time a CPU
                overrides += [
                    f"+trainer.limit_train_batches={args.steps}",
                    "+trainer.limit_val_batches=2",
                ]
            result = train_py(Path(scratch) / f"run-{name}", *overrides)
            metrics = result.pop("metrics")
            train_images = metrics["split_sizes"]["train"]
            # The loader drops a last batch of one image (make_loader); the CPU run stops early.
            images_per_epoch = train_images - int(train_images % args.batch_size == 1)
            if not on_gpu:
                images_per_epoch = min(images_per_epoch, args.steps * args.batch_size)
            epoch_seconds = metrics["train_epoch_seconds"]
            steady = statistics.median(epoch_seconds[1:] or epoch_seconds)
            pipeline = round(images_per_epoch / steady, 1)
            emit(
                {
                    "benchmark": "throughput",
                    "device": where,
                    "model": name,
                    "precision": args.precision,
                    "batch_size": args.batch_size,
                    "num_workers": args.num_workers,
                    "train_images": train_images,
                    "model_only_images_per_s": alone,
                    **{f"loader_only{k}_images_per_s": v for k, v in loader.items()},
                    "pipeline_images_per_s": pipeline,
                    "pipeline_over_model_only": ratio(pipeline, alone),
                    "loader_over_model_only": ratio(loader[""], alone),
                    "epoch_seconds": epoch_seconds,
                    "peak_memory_mb": result["peak_memory_mb"],
                    "target_met": {"pipeline>=0.9*model_only": pipeline >= 0.9 * alone}
                    if on_gpu
                    else "GPU target only",
                }
            )


if __name__ == "__main__":
    main()
