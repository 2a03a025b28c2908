"""Linear probe on hymenoptera with efficientnet_lite0: is the project's cached-feature run as
cheap as one forward pass over the data?

    python benchmarks/linear_probe.py [--data-root $FINETUNE_DATA_ROOT] [--tutorial-epochs 25]

Prints one JSON line per measurement, then a summary line with the ratios and targets:
  (a) bare loop: load the model, one no_grad forward pass over train + val (eval preset);
  (b) the project's train.py (strategy=last_layer augment=none), cold then warm feature cache;
  (c) the PyTorch tutorial's loop: frozen backbone recomputed every epoch, SGD, batch 4.
Seconds are compared two ways: `work_seconds` (inside the process, after Python and its
imports have loaded; what the targets use) and `wall_seconds` (the whole process). The bare loop
and the warm run take a few seconds and vary by +-10% on a shared machine, so each is the median
of `--repeats` runs (every run is printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import DATA_ROOT, PLAIN_ENV, emit, ratio, run_measured, train_py


def median_run(runs: list[dict]) -> dict:
    """The run with the median work seconds."""
    middle = statistics.median_low(run["work_seconds"] for run in runs)
    return next(run for run in runs if run["work_seconds"] == middle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--tutorial-epochs", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plain = [sys.executable, "benchmarks/plain_loops.py", "--data-root", str(args.data_root)]

    bare_runs = []
    for _ in range(args.repeats):
        bare = run_measured([*plain, "bare_forward"], env=PLAIN_ENV)
        bare["work_seconds"] = bare.pop("seconds_inside")
        emit({"benchmark": "linear_probe", "run": "a_bare_forward", **bare})
        bare_runs.append(bare)
    bare = median_run(bare_runs)

    project = {}
    with tempfile.TemporaryDirectory() as scratch:
        options = [
            "model=efficientnet_lite0",
            "strategy=last_layer",
            "augment=none",
            "data=hymenoptera",
            f"paths.data_root={args.data_root}",
            f"data.cache_dir={scratch}/cache",  # starts empty: the first run is cold
        ]
        for cache, repeats in (("cold", 1), ("warm", args.repeats)):
            runs = []
            for repeat in range(repeats):
                result = train_py(Path(scratch) / f"{cache}{repeat}", *options)
                metrics = result.pop("metrics")
                runs.append(
                    {
                        **result,
                        "work_seconds": metrics["run_seconds"],
                        "val_acc": round(metrics["val/acc"], 4),
                        "feature_cache": metrics["feature_cache"],
                        "feature_cache_seconds": metrics["feature_cache_seconds"],
                        "epochs": metrics["epochs"],
                    }
                )
                emit({"benchmark": "linear_probe", "run": f"b_train_py_{cache}", **runs[-1]})
            project[cache] = median_run(runs)

    tutorial = run_measured(
        [*plain, "tutorial_probe", "--epochs", str(args.tutorial_epochs), "--batch-size", "4"],
        env=PLAIN_ENV,
    )
    tutorial["work_seconds"] = tutorial.pop("seconds_inside")
    emit({"benchmark": "linear_probe", "run": "c_tutorial_loop", **tutorial})

    cold, warm = project["cold"], project["warm"]
    summary = {
        "benchmark": "linear_probe",
        "run": "summary",
        "b_cold_over_a": ratio(cold["work_seconds"], bare["work_seconds"]),
        "b_warm_over_a": ratio(warm["work_seconds"], bare["work_seconds"]),
        "b_cold_over_c": ratio(cold["work_seconds"], tutorial["work_seconds"]),
        "wall_b_cold_over_a": ratio(cold["wall_seconds"], bare["wall_seconds"]),
        "wall_b_warm_over_a": ratio(warm["wall_seconds"], bare["wall_seconds"]),
        "wall_b_cold_over_c": ratio(cold["wall_seconds"], tutorial["wall_seconds"]),
        "val_acc_project": cold["val_acc"],
        "val_acc_tutorial": tutorial["val_acc"],
        "repeats": args.repeats,
    }
    summary["targets_met"] = {
        "b_cold_over_a<=1.3": summary["b_cold_over_a"] <= 1.3,
        "b_cold_over_c<=0.1": summary["b_cold_over_c"] <= 0.1,
        "b_warm_over_a<0.2": summary["b_warm_over_a"] < 0.2,
        "val_acc>=tutorial": cold["val_acc"] >= tutorial["val_acc"],
    }
    emit(summary)


if __name__ == "__main__":
    main()
