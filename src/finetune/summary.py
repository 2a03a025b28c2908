"""Sweep summaries: one row per run of a Hydra multirun, aggregates over seeds, and a plot.

Written automatically when a multirun ends (the Hydra callback `SweepSummary`, configured in
`conf/hydra/default.yaml`) and runnable by hand on any sweep folder:

    python -m finetune.summary outputs/multirun/2026-11-28_12-00-00

Files written into the sweep folder:
- `summary.csv`: one row per run: job number, status (`ok`, `failed` or `diverged`, with the
  error), its overrides (one column per swept key), val/test accuracy and macro-F1, the metric
  that chose the best checkpoint (`selection.metric`) and its value, trainable params, fit
  seconds and the feature cache they include (`finetune.sweep_times`: `miss` extracted).
- `summary.md`: the same table, and when the sweep has a `seed` or `data.fold` axis, mean +- std
  over them of the accuracies, macro-F1 and fit seconds (per feature-cache state where the runs
  mix them) for every other combination.
- `tensorboard/`: a link per run to its TensorBoard events, named by its swept values, for
  `tensorboard --logdir <sweep folder>/tensorboard`.
- `summary.png` (`finetune.sweep_plot`): val accuracy per combination of the swept values (bars
  with the std over seeds and their values, the axis zoomed to the data's range), each bar
  named by the overrides it holds; when `data.train_fraction` is swept, learning curves:
  accuracy against training images.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from finetune import sweep_plot, sweep_times
from finetune.atomic import atomic_write
from finetune.progress import progress
from finetune.rundir import FAILURE_FILE, METRICS_FILE
from finetune.sweep_plot import (  # noqa: F401 - importable from here too
    accuracy_range,
    shows_learning_curves,
)

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "val_acc",
    "test_acc",
    "val_macro_f1",
    "test_macro_f1",
    "selected_by",
    "selected_value",
    "trainable_params",
    "fit_seconds",
    "feature_cache",
    "train_images",
)
AGGREGATED = ("val_acc", "test_acc", "val_macro_f1", "test_macro_f1", "fit_seconds")
# A failed run whose error says the training diverged (finetune.module's stops, the probe's
# non-finite solve): a learning rate to lower, not a bug to look for.
DIVERGED = re.compile(r"\bdiverged\b", re.IGNORECASE)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def _parse_overrides(lines: list[str]) -> dict[str, str]:
    overrides = {}
    for line in lines:
        key, _, value = line.partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder of the sweep, finished or failed."""
    rows = []
    for job in _job_dirs(Path(sweep_dir)):
        overrides = _parse_overrides(
            yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        )
        row: dict[str, Any] = {"job": job.name, "overrides": overrides}
        metrics_file = job / METRICS_FILE
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            selected_by = metrics.get("selection_metric", "val/acc")  # older runs: by val/acc
            row |= {
                "status": "ok",
                "val_acc": metrics.get("val/acc"),
                "test_acc": metrics.get("test/acc"),
                "val_macro_f1": metrics.get("val/macro_f1"),
                "test_macro_f1": metrics.get("test/macro_f1"),
                "selected_by": selected_by,
                "selected_value": metrics.get(selected_by),
                "trainable_params": metrics.get("trainable_params"),
                "fit_seconds": metrics.get("fit_seconds"),
                "feature_cache": sweep_times.cache_state(metrics),
                "train_images": (metrics.get("split_sizes") or {}).get("train"),
                "model": metrics.get("model"),
                "strategy": metrics.get("strategy"),
                "seed": metrics.get("seed"),
            }
        else:
            failure_file = job / FAILURE_FILE
            failure = json.loads(failure_file.read_text()) if failure_file.is_file() else {}
            error = failure.get("error", "no metrics.json (the run did not finish)")
            row |= {"status": "diverged" if DIVERGED.search(error) else "failed", "error": error}
        rows.append(row)
    # A run that left a key at its default shows the value it ran with, not a blank cell: a
    # sweep `strategy=last_layer,full` next to a run of the default strategy reads right.
    keys = dict.fromkeys(key for row in rows for key in row["overrides"])
    for row in rows:
        missing = [key for key in keys if key not in row["overrides"]]
        if missing:
            recorded = _run_values(Path(sweep_dir) / row["job"], missing)
            row["overrides"] |= {key: value for key, value in recorded.items() if value is not None}
    return rows


def _run_values(job: Path, keys: list[str]) -> dict[str, str | None]:
    """The value each key had in the run of `job` (a config group's option, from Hydra's
    `.hydra/hydra.yaml`, else the dotted key of `config.yaml`), as an override writes it; None
    when the run did not record it. Each file is read once."""
    hydra_file, config_file = job / ".hydra" / "hydra.yaml", job / "config.yaml"
    hydra = yaml.safe_load(hydra_file.read_text()) if hydra_file.is_file() else None
    choices = (((hydra or {}).get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    return {key: _value_of(key, choices, config) for key in keys}


def _value_of(key: str, choices: dict[str, Any], config: Any) -> str | None:
    if choices.get(key) is not None:
        return str(choices[key])
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict | list):
        return None
    return yaml.safe_dump(node).removesuffix("\n...\n").strip()


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between runs, in the order they first appear."""
    keys: dict[str, None] = {}
    for row in rows:
        keys |= dict.fromkeys(row["overrides"])
    return [
        key for key in keys if len({row["overrides"].get(key, "") for row in rows}) > 1
    ] or list(keys)[:1]


def fixed_overrides(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Overrides every run of the sweep shares (the command line's constant part)."""
    varying = set(swept_keys(rows)) if len(rows) > 1 else set()
    shared = {k: v for k, v in rows[0]["overrides"].items() if k not in varying} if rows else {}
    return {k: v for k, v in shared.items() if all(r["overrides"].get(k) == v for r in rows)}


# Sweep axes whose runs are repeats of one experiment: averaged over in the summary.
REPEAT_AXES = ("seed", "data.fold")


def aggregate(
    rows: list[dict[str, Any]], over: tuple[str, ...] = REPEAT_AXES
) -> list[dict[str, Any]]:
    """Mean and std of the accuracies per combination of the other overrides (all but the
    keys `over`); failed runs are counted (`failed`) but not averaged."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    keys = [key for key in swept_keys(rows) if key not in over]
    for row in rows:
        group = tuple(row["overrides"].get(key, "") for key in keys)
        groups.setdefault(group, []).append(row)
    table = []
    for group, members in groups.items():
        finished = [m for m in members if m["status"] == "ok"]
        entry: dict[str, Any] = dict(zip(keys, group, strict=True))
        entry |= {"runs": len(members), "failed": len(members) - len(finished)}
        for column in AGGREGATED:
            values = [m[column] for m in finished if m.get(column) is not None]
            entry[f"{column}_mean"] = statistics.mean(values) if values else None
            entry[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        # minutes of extraction and seconds of cache reads have no common mean: per state
        times = sweep_times.seconds_by_cache(finished)
        entry |= {"fit_seconds_by_cache": times, "feature_cache": sweep_times.states_cell(times)}
        if len(times) > 1:
            entry["fit_seconds_mean"] = entry["fit_seconds_std"] = None
        entry["train_images"] = finished[0].get("train_images") if finished else None
        entry["strategy"] = (finished[0] if finished else entry).get("strategy")
        entry["model"] = finished[0].get("model") if finished else None
        table.append(entry)
    return table


def _fmt(value: Any, column: str = "") -> str:
    """A cell: accuracies to 4 decimals, seconds to 1 (37.3, not 37.3000)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column.endswith("seconds") else f"{value:.4f}"
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = swept_keys(rows)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["job", "status", *keys, *METRIC_COLUMNS, "error"])
    for row in rows:
        writer.writerow(
            [
                row["job"],
                row["status"],
                *(row["overrides"].get(key, "") for key in keys),
                *(_fmt(row.get(column), column) for column in METRIC_COLUMNS),
                row.get("error", ""),
            ]
        )
    _write_text(path, text.getvalue())


def _write_text(path: Path, text: str) -> None:
    """Atomically: the notebook may read the summary while a sweep rewrites it."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def write_markdown(rows: list[dict[str, Any]], path: Path, sweep_dir: Path) -> None:
    failed = sum(row["status"] != "ok" for row in rows)
    diverged = sum(row["status"] == "diverged" for row in rows)
    parts = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(rows)} runs, {len(rows) - failed} finished, {failed} failed"
        + (f" ({diverged} diverged: lower the learning rate)." if diverged else "."),
        "",
        "Shared overrides: "
        + (" ".join(f"`{k}={v}`" for k, v in fixed_overrides(rows).items()) or "none"),
        "",
        runs_table(rows),
    ]
    if sweep_times.mixes_states(rows):
        parts += ["", sweep_times.NOTE]
    means = mean_table(rows)
    if means:
        parts += ["", f"## {means[0]}", "", means[1]]
    _write_text(path, "\n".join(parts) + "\n")


def runs_table(rows: list[dict[str, Any]], errors: bool = True) -> str:
    """The Markdown table of one row per run: its swept values and metrics (and error)."""
    keys = swept_keys(rows)
    return _markdown_table(
        [
            "job",
            "status",
            *keys,
            *(c.replace("_", " ") for c in METRIC_COLUMNS),
            *(["error"] if errors else []),
        ],
        [
            [
                row["job"],
                row["status"],
                *(row["overrides"].get(key, "") for key in keys),
                *(_fmt(row.get(column), column) for column in METRIC_COLUMNS),
                *([row.get("error", "")[:200]] if errors else []),
            ]
            for row in rows
        ],
    )


def mean_table(rows: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The heading and Markdown table of the means +- std over the sweep's `seed` and
    `data.fold` axes, per combination of its other swept values; None without such an axis."""
    keys = swept_keys(rows)
    repeats = [key for key in REPEAT_AXES if key in keys]
    if not repeats:
        return None
    others = [key for key in keys if key not in repeats]
    names = {"seed": "seeds", "data.fold": "folds"}
    aggregated = [c.replace("_", " ") for c in AGGREGATED]
    header = [*others, "runs", "failed", *aggregated, "feature cache"]
    body = [
        [
            *(str(entry[key]) for key in others),
            str(entry["runs"]),
            str(entry["failed"]),
            *(_mean_std(entry, column) for column in AGGREGATED),
            entry["feature_cache"],
        ]
        for entry in aggregate(rows)
    ]
    heading = f"Mean +- std over {' and '.join(names[key] for key in repeats)}"
    return heading, _markdown_table(header, body)


CONSOLE_ROWS = 30  # the most table rows the end of a sweep prints (summary.md has them all)


def console_table(rows: list[dict[str, Any]]) -> str:
    """What the end of a sweep prints: the mean table (or, without seeds or folds, the runs'
    table without errors), at most `CONSOLE_ROWS` rows of it."""
    means = mean_table(rows)
    heading, table = means if means else ("Runs", runs_table(rows, errors=False))
    lines = table.split("\n")
    shown, hidden = lines[: 2 + CONSOLE_ROWS], len(lines) - 2 - CONSOLE_ROWS
    more = [f"... {hidden} more row(s) in summary.md"] if hidden > 0 else []
    return "\n".join([f"{heading}:", *shown, *more])


def _mean_std(entry: dict[str, Any], column: str) -> str:
    if column == "fit_seconds" and len(entry["fit_seconds_by_cache"]) > 1:
        return sweep_times.seconds_cell(entry["fit_seconds_by_cache"])
    mean = entry[f"{column}_mean"]
    return "" if mean is None else f"{_fmt(mean, column)} +- {_fmt(entry[f'{column}_std'], column)}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """summary.png (`finetune.sweep_plot`): learning curves when `data.train_fraction` is
    swept, else bars; each names the swept values it holds and the axes averaged over."""
    import matplotlib.pyplot as plt

    keys = swept_keys(rows) if len(rows) > 1 else []
    table = [e for e in aggregate(rows) if e["val_acc_mean"] is not None]
    figure = sweep_plot.draw(
        table,
        [key for key in keys if key not in REPEAT_AXES],
        [key for key in REPEAT_AXES if key in keys],
        curves=shows_learning_curves(rows),
    )
    try:
        atomic_write(path, lambda handle: figure.savefig(handle, dpi=110, format="png"))
    finally:
        plt.close(figure)


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write summary.csv, summary.md and summary.png into `sweep_dir`; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        log.warning("No runs found in %s: nothing to summarise", sweep_dir)
        return rows
    with progress(f"Summarising {len(rows)} runs", 3, "files") as advance:
        write_csv(rows, sweep_dir / "summary.csv")
        advance(1)
        write_markdown(rows, sweep_dir / "summary.md", sweep_dir)
        advance(1)
        plot(rows, sweep_dir / "summary.png")  # matplotlib: the slow part
        advance(1)
    log.info("Sweep summary: %s\n%s", sweep_dir / "summary.md", console_table(rows))
    if link_tensorboard_runs(rows, sweep_dir):
        log.info(
            "TensorBoard, runs named by their overrides: tensorboard --logdir %s",
            sweep_dir / TENSORBOARD_LINKS,
        )
    return rows


TENSORBOARD_LINKS = "tensorboard"  # in the sweep folder: one link per run, named by overrides


def link_tensorboard_runs(rows: list[dict[str, Any]], sweep_dir: Path) -> int:
    """In `sweep_dir/tensorboard/`, a link per run to its TensorBoard folder, named by the
    values of the swept keys (`model=resnet18,strategy=full`): TensorBoard names a run by its
    folder, and the job folders are numbers. Returns how many links there are; none where the
    file system has no symbolic links."""
    folder = sweep_dir / TENSORBOARD_LINKS
    keys = swept_keys(rows)
    linked = 0
    for row in rows:
        events = sweep_dir / row["job"] / "tensorboard"
        if not events.is_dir():
            continue  # failed before its logger started
        name = ",".join(f"{key}={row['overrides'].get(key, '')}" for key in keys)
        link = folder / (name.replace("/", "_").replace(os.sep, "_") or row["job"])
        if link.is_symlink() and link.resolve() != events.resolve():
            link = link.with_name(f"{link.name},job={row['job']}")  # the same overrides twice
        try:
            folder.mkdir(exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(Path("..") / row["job"] / "tensorboard", target_is_directory=True)
        except OSError:
            return linked
        linked += 1
    return linked


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends. Failed jobs do not stop
    the sweep (train.py records them), so this runs after every sweep."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        write_summary(config.hydra.sweep.dir)


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarise a Hydra sweep folder.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sweep = args.sweep_dir
    if not sweep.is_dir() or not _job_dirs(sweep):
        what = "does not exist" if not sweep.exists() else "holds no sweep jobs"
        if sweep.is_dir() and (sweep / ".hydra").is_dir():
            what = "is a single run, not a sweep (its metrics.json is its summary)"
        parser.exit(
            1,
            f"Error: {sweep} {what}. Fix: give the folder of a `train.py -m` sweep (its "
            "numbered job folders 0/, 1/, ...), e.g. outputs/multirun/<date>_<time>.\n",
        )
    rows = write_summary(sweep)
    print(f"{len(rows)} runs summarised in {sweep}/summary.{{csv,md,png}}")


if __name__ == "__main__":
    main()
