"""The page `benchmarks/accuracy.py` writes (docs/accuracy.md) and its data (docs/accuracy.json).

The JSON beside the page holds every run's record by case id, each with its date and machine;
a run of a subset (`--only`) replaces those cases and keeps the others, so the page always shows
the latest measurement of every case.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from finetune.atomic import atomic_write, write_json

# (heading, record key) of the runs table; seconds in the units of metrics.json
RUN_COLUMNS = (
    ("case", "case"),
    ("strategy", "strategy"),
    ("augment", "augment"),
    ("settings", "settings"),
    ("seed", "seed"),
    ("val acc", "val_acc"),
    ("val balanced acc", "val_balanced_acc"),
    ("val macro-F1", "val_macro_f1"),
    ("probe val acc", "probe_val_acc"),
    ("val top-5", "val_acc_top5"),
    ("test acc", "test_acc"),
    ("fit s", "fit_seconds"),
    ("run s", "run_seconds"),
    ("work s", "work_seconds"),
    ("wall s", "wall_seconds"),
    ("peak MB", "peak_memory_mb"),
    ("best epoch", "best_epoch"),
    ("epochs", "epochs"),
    ("feature cache", "feature_cache"),
    ("adaptive", "adaptive"),
    ("date", "date"),
)
VERDICT = {True: "pass", False: "**fail**", None: "not measured"}
TILE_CASES = tuple(
    f"magnetic-tile/{strategy}/{name}"
    for strategy in ("last_layer", "full")
    for name in ("defaults", "weighted")
)
# magnetic-tile's numbers before class weighting and the imbalance metrics' selection existed:
# `python train.py model=efficientnet_lite0 data=imagefolder data.root=.../magnetic-tile
# strategy=last_layer`, all defaults, run by hand (not by this script) on 2026-12-07 on the
# 2-core Intel Xeon CPU machine of this page's runs; the automatic split, 268 val images.
BEFORE = {
    "what": "last_layer, defaults, before class weighting (train.py by hand, 2026-12-07, "
    "2-core Intel Xeon CPU)",
    "val_acc": 0.914,
    "val_balanced_acc": 0.756,
    "val_macro_f1": 0.822,
    "recalls": "fray 0.5, break 0.65",
}


def machine() -> str:
    """CPU model, core count, GPU (or none) and torch version of this machine, in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as info:
        models = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    cpu = models[0] if models else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores, {gpu}, torch {torch.__version__}"


def sidecar(table: Path) -> Path:
    return table.with_suffix(".json")


def merge_runs(
    table: Path, runs: dict[str, dict], known: list[str], subset: bool, here: str
) -> dict[str, dict]:
    """`runs` stamped with the machine `here`, after the earlier page's runs of the other
    `known` case ids when only a `subset` ran (a full run replaces the page); in `known`'s
    order."""
    merged = {case: {**run, "machine": here} for case, run in runs.items()}
    if subset and sidecar(table).is_file():
        earlier = json.loads(sidecar(table).read_text())["runs"]
        merged = {**{c: r for c, r in earlier.items() if c in known}, **merged}
    return {case: merged[case] for case in known if case in merged}


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):  # the adaptive rules' choices
        return ", ".join(f"{key}={cell(item)}" for key, item in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def render(runs: dict[str, dict], rows: list[dict], command: str, when: str, here: str) -> str:
    lines = [
        "# Accuracy of the defaults",
        "",
        "Written by `benchmarks/accuracy.py` ([benchmarks/README.md](../benchmarks/README.md#accuracy));",
        "the script rewrites this page and `accuracy.json` beside it, do not edit by hand.",
        "efficientnet_lite0, default settings; hymenoptera, the Flowers102 val split, and",
        "magnetic-tile (class folders split automatically, 268 val images; imbalanced 30:1).",
        "",
        f"- Date: {when}",
        f"- Machine: {here}",
        f"- Command: `{command}`",
    ]
    elsewhere: dict[str, list[str]] = {}
    for case, run in runs.items():
        if run.get("machine") != here:
            elsewhere.setdefault(run.get("machine") or "unknown", []).append(case)
    for other, cases in elsewhere.items():
        lines.append(f"- Kept from an earlier page, measured on {other}: {', '.join(cases)}")
    lines += ["", "## Targets", "", "| target | measured | target | result |"]
    lines.append("|---|---|---|---|")
    for row in rows:
        goal = "reported" if row["op"] == "report" else f"{row['op']} {cell(row['goal'])}"
        verdict = "-" if row["op"] == "report" else VERDICT[row["passed"]]
        lines.append(f"| {row['target']} | {cell(row['measured'])} | {goal} | {verdict} |")
    lines += ["", *tiles_section(runs)]
    lines += ["", "## Runs", "", "| " + " | ".join(h for h, _ in RUN_COLUMNS) + " | error |"]
    lines.append("|" + "---|" * (len(RUN_COLUMNS) + 1))
    for run in runs.values():
        values = [cell(run.get(key)) for _, key in RUN_COLUMNS] + [cell(run.get("error"))]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def tiles_section(runs: dict[str, dict]) -> list[str]:
    """magnetic-tile before and after: the hand-measured figures of `BEFORE`, then each case of
    the dataset with its accuracy, balanced accuracy, macro-F1 and per-class recall ("not
    measured" for a case without a run, an error for a failed one)."""
    lines = ["## magnetic-tile: before and after class weighting", ""]
    lines += ["| run | val acc | val balanced acc | val macro-F1 | val recall per class |"]
    lines += ["|---|---|---|---|---|"]
    numbers = [cell(BEFORE[key]) for key in ("val_acc", "val_balanced_acc", "val_macro_f1")]
    lines.append(f"| {BEFORE['what']} | {' | '.join(numbers)} | {BEFORE['recalls']} |")
    for case in TILE_CASES:
        run = runs.get(case)
        if run is None or "error" in run:
            why = "not measured" if run is None else f"failed: {cell(run['error'])}"
            lines.append(f"| {case} | {why} | | | |")
            continue
        numbers = [cell(run.get(key)) for key in ("val_acc", "val_balanced_acc", "val_macro_f1")]
        recalls = run.get("val_recall_by_class") or {}
        recall_text = ", ".join(f"{name} {cell(value)}" for name, value in recalls.items())
        lines.append(f"| {case} | {' | '.join(numbers)} | {recall_text or '-'} |")
    return lines


def write(table: Path, runs: dict[str, dict], rows: list[dict], command: str, here: str) -> None:
    """The page at `table` and the runs, by case id, in the JSON beside it (both atomic)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = render(runs, rows, command, when, here)
    write_json(sidecar(table), {"date": when, "machine": here, "command": command, "runs": runs})
    atomic_write(table, lambda handle: handle.write(text.encode()))
