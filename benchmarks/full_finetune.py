"""Full fine-tuning on hymenoptera with efficientnet_lite0: seconds per training epoch of the
project's train.py against a plain PyTorch loop with the same model, batch size and transforms.

    python benchmarks/full_finetune.py [--epochs 3] [--batch-size 32]

Both train every layer with BatchNorm in training mode (strategy.bn=train) and random resized
crops + flips; the first epoch (worker start-up, allocator warm-up) is left out of the average.
A third run shows the project with its speed switches off (speed.channels_last=false,
data.decode_cache_mb=0), i.e. what Lightning and the project cost by themselves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import DATA_ROOT, PLAIN_ENV, emit, ratio, run_measured, train_py


def steady(seconds: list[float]) -> float:
    return round(statistics.mean(seconds[1:] or seconds), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    plain = run_measured(
        [
            sys.executable,
            "benchmarks/plain_loops.py",
            "finetune_epochs",
            "--data-root",
            str(args.data_root),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
        ],
        env=PLAIN_ENV,
    )
    plain["seconds_per_epoch"] = steady(plain["epoch_seconds"])
    emit({"benchmark": "full_finetune", "run": "plain_pytorch", **plain})

    options = [
        "model=efficientnet_lite0",
        "strategy=full",
        "strategy.bn=train",
        "data=hymenoptera",
        f"paths.data_root={args.data_root}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
    ]
    variants = {
        "project": [],
        "project_speed_switches_off": ["speed.channels_last=false", "data.decode_cache_mb=0"],
    }
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in variants.items():
            result = train_py(Path(scratch) / name, *options, *extra)
            metrics = result.pop("metrics")
            results[name] = {
                **result,
                "epoch_seconds": metrics["train_epoch_seconds"],
                "seconds_per_epoch": steady(metrics["train_epoch_seconds"]),
                "val_acc": round(metrics["val/acc"], 4),
            }
            emit({"benchmark": "full_finetune", "run": name, **results[name]})

    summary = {
        "benchmark": "full_finetune",
        "run": "summary",
        "project_over_plain": ratio(
            results["project"]["seconds_per_epoch"], plain["seconds_per_epoch"]
        ),
        "switches_off_over_plain": ratio(
            results["project_speed_switches_off"]["seconds_per_epoch"], plain["seconds_per_epoch"]
        ),
    }
    summary["targets_met"] = {"project_over_plain<=1.0": summary["project_over_plain"] <= 1.0}
    emit(summary)


if __name__ == "__main__":
    main()
