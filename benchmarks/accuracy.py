"""Accuracy and training time of the project's defaults against their targets.

    python benchmarks/accuracy.py [--data-root $FINETUNE_DATA_ROOT] [--only CASE ...] [--list]
                                  [--work-dir DIR] [--table docs/accuracy.md]

Runs `train.py` with efficientnet_lite0 and nothing but the model, the data, the strategy, the
augmentation and the seed chosen (and, on magnetic-tile, the imbalance setting; epochs, batch
size and learning rate stay the defaults), each run in a process of its own
(`common.run_measured`: wall seconds, peak memory):
  flowers102 (val split): last_layer augment=none, last_layer, lp_ft, full;
  hymenoptera: last_layer, full and lp_ft with seeds 0, 1, 2 (the targets use their mean or a
  count over them), scratch, and last_layer augment=none twice on one feature cache (cold,
  then warm);
  and, for the time ratios, plain_loops' bare forward pass over train + val of each dataset
  (on hymenoptera with the least wall time of a process that only imports torch, and of one
  that imports finetune.run: the floors of the warm run's);
  magnetic-tile (class folders without a split: data=imagefolder): last_layer and full, each with
  the defaults and with the imbalance setting (data.class_weights=balanced,
  selection.metric=val/macro_f1).
Every run gets its own folder under the work folder (its run dir and a fresh `paths.cache_dir`,
which the warm run shares with the cold one), so no run finds features or image checks of an
earlier one. Prints one JSON line per run, then a summary line: each target
(`accuracy_targets.TARGETS`) with the measured value and whether it passed. Writes the Markdown
page `--table` and its data (the same name, `.json`) next to it; with `--only`, the runs of the
earlier page that were not re-run are kept.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import accuracy_page as page
from accuracy_targets import SMALL_CLASSES, summarise

from common import DATA_ROOT, PLAIN_ENV, REPO, emit, run_measured, train_py

DATA_FOLDERS = {
    "hymenoptera": "hymenoptera_data",
    "flowers102": "flowers-102",
    "magnetic-tile": "magnetic-tile",
}
# The documented setting for imbalanced classes: weight the loss (and the probe's objective) and
# choose the checkpoint and the probe's L2 by macro-F1.
WEIGHTED = ("data.class_weights=balanced", "selection.metric=val/macro_f1")
MARKER = ".accuracy-case"  # marks a case folder this script made (and may replace)


@dataclass(frozen=True)
class Case:
    """One run: `strategy` None is the bare forward loop; `cache_of` names the case whose
    feature cache this run reuses (the warm run); `data` is the data config when it is not the
    dataset's own (`imagefolder`: `data.root` is the dataset's folder); `settings` are further
    train.py overrides the case is about (the imbalance setting)."""

    id: str
    dataset: str
    strategy: str | None = None
    augment: str = "default"
    seed: int | None = None
    cache_of: str | None = None
    data: str | None = None
    settings: tuple[str, ...] = ()

    def overrides(self, data_root: Path | str = "DATA_ROOT") -> list[str]:
        """The train.py choices of this case, besides the run's folders and `paths.data_root`;
        `data.root` below `data_root` for a data config that needs it."""
        data = self.data or self.dataset
        chosen = ["model=efficientnet_lite0", f"data={data}", f"strategy={self.strategy}"]
        if data == "imagefolder":
            chosen.append(f"data.root={Path(data_root) / DATA_FOLDERS[self.dataset]}")
        chosen += [] if self.augment == "default" else [f"augment={self.augment}"]
        chosen += [] if self.seed is None else [f"seed={self.seed}"]
        return chosen + list(self.settings)


def all_cases() -> list[Case]:
    hymenoptera = [
        Case(f"hymenoptera/{strategy}/seed{seed}", "hymenoptera", strategy, seed=seed)
        for strategy in ("last_layer", "full", "lp_ft")
        for seed in (0, 1, 2)
    ]
    cold = "hymenoptera/last_layer_noaug/cold"
    tiles = [
        Case(f"magnetic-tile/{strategy}/{name}", "magnetic-tile", strategy, data="imagefolder", settings=settings)
        for strategy in ("last_layer", "full")
        for name, settings in (("defaults", ()), ("weighted", WEIGHTED))
    ]  # fmt: skip
    return [
        Case("hymenoptera/bare_forward", "hymenoptera"),
        *hymenoptera,
        Case("hymenoptera/scratch", "hymenoptera", "scratch"),
        Case(cold, "hymenoptera", "last_layer", "none"),
        Case("hymenoptera/last_layer_noaug/warm", "hymenoptera", "last_layer", "none", None, cold),
        Case("flowers102/bare_forward", "flowers102"),
        Case("flowers102/last_layer_noaug", "flowers102", "last_layer", "none"),
        Case("flowers102/last_layer", "flowers102", "last_layer"),
        Case("flowers102/lp_ft", "flowers102", "lp_ft"),
        Case("flowers102/full", "flowers102", "full"),
        *tiles,
    ]


def select(cases: list[Case], patterns: list[str] | None) -> list[Case]:
    """The cases matching any pattern (the whole id, a glob, or a prefix ending at a `/`), plus
    the cold run a selected warm run needs; all cases when `patterns` is None."""
    if patterns is None:
        return cases
    unknown = [p for p in patterns if not any(matches(c.id, p) for c in cases)]
    if unknown:
        raise SystemExit(
            f"accuracy.py: --only {unknown[0]} matches no case; `--list` prints the case ids."
        )
    chosen = {c.id for c in cases if any(matches(c.id, p) for p in patterns)}
    chosen |= {c.cache_of for c in cases if c.id in chosen and c.cache_of}
    return [c for c in cases if c.id in chosen]


def matches(case_id: str, pattern: str) -> bool:
    pattern = pattern.rstrip("/")
    return fnmatchcase(case_id, pattern) or case_id.startswith(pattern + "/")


# --- running -------------------------------------------------------------------------------------


def case_folder(work: Path, case: Case) -> Path:
    """The case's fresh folder: one this script made before is replaced, any other refused."""
    folder = work / case.id
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise SystemExit(
                f"accuracy.py: {folder} exists and was not made by this benchmark; choose "
                "another --work-dir or remove it."
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).touch()
    return folder


def run_case(case: Case, args, work: Path) -> dict[str, Any]:
    """Run one case and return its record (with "error" when the run failed)."""
    record = {"case": case.id, "dataset": case.dataset, "strategy": case.strategy or "-"}
    try:
        if case.strategy is None:
            return {**record, **bare_forward(case, args)}
        return {**record, **train_run(case, args, work)}
    except (RuntimeError, OSError, KeyError, ValueError) as error:
        return {**record, "error": f"{type(error).__name__}: {error}"}


def bare_forward(case: Case, args) -> dict[str, Any]:
    loop = [sys.executable, "benchmarks/plain_loops.py", "bare_forward"]
    measured = run_measured(
        [*loop, "--data-root", str(args.data_root), "--dataset", case.dataset], env=PLAIN_ENV
    )
    measured.pop("loop", None)
    measured["work_seconds"] = measured.pop("seconds_inside")  # after imports, as linear_probe.py
    if case.dataset == "hymenoptera":  # the warm run's floors
        measured |= import_floors()
    return measured


def import_floors() -> dict[str, float]:
    """The least wall seconds of 3 processes that only import torch, and of 3 that import what
    train.py's run needs (`finetune.run`: Lightning, torchvision, Hydra): no run can start
    faster. A failed import is left out, and the ratios that need it are not measured."""
    floors = {}
    for field, module in (("import_torch", "torch"), ("import_run", "finetune.run")):
        try:
            walls = [
                run_measured([sys.executable, "-c", f"import {module}"], env=PLAIN_ENV)
                for _ in range(3)
            ]
        except RuntimeError:
            continue
        floors[f"{field}_wall_seconds"] = min(wall["wall_seconds"] for wall in walls)
    return floors


def train_run(case: Case, args, work: Path) -> dict[str, Any]:
    folder = case_folder(work, case)
    cache = work / (case.cache_of or case.id) / "cache"
    result = train_py(
        folder / "run",
        *case.overrides(args.data_root),
        f"paths.data_root={args.data_root}",
        f"paths.cache_dir={cache}",
        "data.download=false",  # a benchmark measures the data it was given, never fetches
        *args.extra,
    )
    history = val_acc_by_epoch(folder / "run")
    return run_record(case, result, result.pop("metrics"), history)


def val_acc_by_epoch(run_dir: Path) -> list[float] | None:
    """The val accuracy after each training epoch, in order, from the run's TensorBoard events
    (metrics.json holds only the best checkpoint's); the point at step 0, a solved probe's own
    validation before any step, is left out (metrics.json's `probe_val_acc` is that number).
    None when the run wrote no events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tensorboard").is_dir():
        return None
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    if "val/acc" not in events.Tags().get("scalars", []):
        return None
    by_step = {point.step: point.value for point in events.Scalars("val/acc") if point.step > 0}
    return [round(by_step[step], 4) for step in sorted(by_step)]


def class_recalls(metrics: dict[str, Any]) -> tuple[dict[str, float] | None, float | None]:
    """Each val class's recall (its accuracy) by name, and the mean recall of the
    `SMALL_CLASSES` classes with the fewest val images; Nones when metrics.json lacks them."""
    ranked = metrics.get("val/acc_per_class_sorted")
    if not ranked:
        return None, None
    recalls = {entry["class"]: round(entry["acc"], 4) for entry in ranked}
    smallest = sorted(ranked, key=lambda entry: entry["images"])[:SMALL_CLASSES]
    return recalls, round(statistics.mean(entry["acc"] for entry in smallest), 4)


def run_record(
    case: Case,
    measured: dict[str, Any],
    metrics: dict[str, Any],
    history: list[float] | None = None,
) -> dict[str, Any]:
    """A train.py run's JSON line: its `metrics.json`, `measured` (common.train_py's wall
    seconds and peak MB) and the val accuracy of each epoch (`history`); keys metrics.json lacks
    (top-5 below 6 classes, test acc without a test split, the adaptive rules' choices before
    they exist, a probe's numbers without one) are left out."""
    recalls, small_classes_recall = class_recalls(metrics)
    record = {
        "augment": case.augment,
        "settings": " ".join(case.settings) or None,
        "seed": metrics.get("seed"),
        "val_acc": metrics["val/acc"],
        "val_balanced_acc": metrics.get("val/balanced_acc"),
        "val_macro_f1": metrics.get("val/macro_f1"),
        "val_acc_top5": metrics.get("val/acc_top5"),
        "test_acc": metrics.get("test/acc"),
        "probe_val_acc": metrics.get("probe_val_acc"),
        "val_acc_by_epoch": history or None,
        "val_recall_by_class": recalls,
        "val_small_classes_recall": small_classes_recall,
        "fit_seconds": metrics["fit_seconds"],
        "run_seconds": metrics["run_seconds"],
        "wall_seconds": measured["wall_seconds"],
        "peak_memory_mb": measured["peak_memory_mb"],
        "best_epoch": metrics.get("best_epoch"),
        "epochs": metrics.get("epochs"),
        "feature_cache": metrics.get("feature_cache"),
        "adaptive": metrics.get("adaptive"),
    }
    for key in (
        "val_acc",
        "val_balanced_acc",
        "val_macro_f1",
        "val_acc_top5",
        "test_acc",
        "probe_val_acc",
    ):
        record[key] = None if record[key] is None else round(record[key], 4)
    return {key: value for key, value in record.items() if value is not None}


def check_data(root: Path, cases: list[Case]) -> None:
    """One sentence and exit status 1 when a dataset the cases need is not under `root`."""
    for dataset in dict.fromkeys(case.dataset for case in cases):
        if not (root / DATA_FOLDERS[dataset]).is_dir():
            raise SystemExit(
                f"accuracy.py: {root / DATA_FOLDERS[dataset]} is missing; pass --data-root DIR, "
                f"the folder that holds {DATA_FOLDERS[dataset]}/ (or set FINETUNE_DATA_ROOT)."
            )


def command_line(argv: list[str]) -> str:
    """This invocation, with the folders of this machine replaced by placeholders."""
    words, hidden = ["python", "benchmarks/accuracy.py"], {"--data-root": "DATA_ROOT"}
    hidden |= {"--work-dir": "WORK_DIR"}
    for index, word in enumerate(argv):
        flag = word.split("=", 1)[0]
        if flag in hidden and "=" in word:
            word = f"{flag}={hidden[flag]}"
        elif index and argv[index - 1] in hidden:
            word = hidden[argv[index - 1]]
        words.append(word)
    return shlex.join(words)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the runs go, one folder per case, kept (default: a temporary folder, removed)",
    )
    parser.add_argument("--only", action="append", metavar="CASE", help="a case id, glob or prefix")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--table", type=Path, default=REPO / "docs" / "accuracy.md")
    # train.py overrides added to every run: the tests' tiny runs (not for measurements)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    cases = select(all_cases(), args.only)
    if args.list:
        for case in cases:
            what = "plain_loops.py bare_forward" if case.strategy is None else case.overrides()
            what = what if isinstance(what, str) else " ".join(what)
            print(case.id, what, f"(the feature cache of {case.cache_of})" if case.cache_of else "")
        return 0
    check_data(args.data_root, cases)
    args.data_root = args.data_root.resolve()
    with tempfile.TemporaryDirectory(prefix="accuracy-") as scratch:
        work = (args.work_dir or Path(scratch)).resolve()
        runs = {}
        for case in cases:
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
            runs[case.id] = {"benchmark": "accuracy", **run_case(case, args, work)}
            runs[case.id]["date"] = started
            emit(runs[case.id])
    known, here = [case.id for case in all_cases()], page.machine()
    merged = page.merge_runs(args.table, runs, known, args.only is not None, here)
    rows = summarise(merged)
    verdicts = [row["passed"] for row in rows]
    counts = {"passed": verdicts.count(True), "failed": verdicts.count(False)}
    counts["not_measured"] = len(rows) - counts["passed"] - counts["failed"]
    emit({"benchmark": "accuracy", "run": "summary", **counts, "targets": rows})
    page.write(args.table, merged, rows, command_line(argv), here)
    failed = [run for run in runs.values() if "error" in run]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
