"""Training throughput (images/s) with bf16-mixed and channels_last: the model alone on
synthetic tensors already on the device, against the project's whole pipeline (train.py on
hymenoptera: decoding, augmentation, loading, Lightning).

    python benchmarks/throughput.py [--models mobilenet_v2 resnet50] [--precision bf16-mixed]

Runs on the GPU when there is one, on the CPU otherwise (with fewer steps: a CPU trains a few
images per second). Weights are random (model.weights=none): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import DATA_ROOT, emit, ratio, train_py
from finetune import backbones
from finetune.features import autocast_for


def model_only(name: str, device: torch.device, batch_size: int, steps: int, precision: str):
    """Training steps of the bare network on one synthetic batch resident on the device."""
    net = backbones.build({"name": name, "source": "torchvision", "weights": "none"}, 2, False)
    net = net.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step() -> None:
        with autocast_for(precision, device):
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


def main() -> None:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=64 if on_gpu else 16)
    parser.add_argument("--steps", type=int, default=30 if on_gpu else 5)
    parser.add_argument("--epochs", type=int, default=6 if on_gpu else 2)
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    args = parser.parse_args()
    device = torch.device("cuda" if on_gpu else "cpu")
    where = torch.cuda.get_device_name() if on_gpu else f"cpu x{os.cpu_count()}"

    for name in args.models:
        alone = model_only(name, device, args.batch_size, args.steps, args.precision)
        with tempfile.TemporaryDirectory() as scratch:
            overrides = [
                f"model={name}",
                "model.weights=none",
                "strategy=full",
                "strategy.bn=train",
                "data=hymenoptera",
                f"data.root={args.data_root}",
                f"data.batch_size={args.batch_size}",
                f"data.num_workers={args.num_workers}",
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
            result = train_py(Path(scratch) / "run", *overrides)
        metrics = result.pop("metrics")
        images_per_epoch = min(
            metrics["split_sizes"]["train"] // args.batch_size * args.batch_size,
            args.batch_size * (args.steps if not on_gpu else 10**9),
        )
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
                "model_only_images_per_s": alone,
                "pipeline_images_per_s": pipeline,
                "pipeline_over_model_only": ratio(pipeline, alone),
                "epoch_seconds": epoch_seconds,
                "peak_memory_mb": result["peak_memory_mb"],
                "target_met": {"pipeline>=0.9*model_only": pipeline >= 0.9 * alone}
                if on_gpu
                else "GPU target only",
            }
        )


if __name__ == "__main__":
    main()
