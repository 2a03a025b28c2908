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
    ("seed", "seed"),
    ("val acc", "val_acc"),
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
        "efficientnet_lite0, default settings; hymenoptera and the Flowers102 val split.",
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
    lines += ["", "## Targets (issue 14)", "", "| target | measured | target | result |"]
    lines.append("|---|---|---|---|")
    for row in rows:
        goal = "reported" if row["op"] == "report" else f"{row['op']} {cell(row['goal'])}"
        verdict = "-" if row["op"] == "report" else VERDICT[row["passed"]]
        lines.append(f"| {row['target']} | {cell(row['measured'])} | {goal} | {verdict} |")
    lines += ["", "## Runs", "", "| " + " | ".join(h for h, _ in RUN_COLUMNS) + " | error |"]
    lines.append("|" + "---|" * (len(RUN_COLUMNS) + 1))
    for run in runs.values():
        values = [cell(run.get(key)) for _, key in RUN_COLUMNS] + [cell(run.get("error"))]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def write(table: Path, runs: dict[str, dict], rows: list[dict], command: str, here: str) -> None:
    """The page at `table` and the runs, by case id, in the JSON beside it (both atomic)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = render(runs, rows, command, when, here)
    write_json(sidecar(table), {"date": when, "machine": here, "command": command, "runs": runs})
    atomic_write(table, lambda handle: handle.write(text.encode()))
