"""summary.png of a sweep: val accuracy per combination of the swept values (bars), or against
the training images when `data.train_fraction` is swept (learning curves).

Each bar or curve names every override that varies in the sweep (`strategy=full`,
`optim.optimizer.lr=0.01`), not only the model and strategy, and the title names the axes its
mean and std are taken over (`seed`, `data.fold`), so two bars of the same strategy at two
learning rates never read as one strategy twice. `finetune.summary` aggregates the rows and
writes the file.
"""

from __future__ import annotations

from typing import Any

CURVE_AXIS = "data.train_fraction"  # swept: learning curves, accuracy against training images


def shows_learning_curves(rows: list[dict[str, Any]]) -> bool:
    """Whether the sweep varies `data.train_fraction` (one fraction for all is no curve)."""
    return len({row["overrides"].get(CURVE_AXIS) for row in rows}) > 1


def label(entry: dict[str, Any], keys: list[str]) -> str:
    """What an aggregated `entry` holds: `key=value` of each of `keys` (the swept keys that
    vary, but the averaged ones), one a line; without such keys, its model / strategy."""
    if keys:
        return "\n".join(f"{key}={entry.get(key, '')}" for key in keys)
    return " / ".join(str(entry[k]) for k in ("model", "strategy") if entry.get(k)) or "run"


def averaged_over(table: list[dict[str, Any]], repeats: list[str]) -> str:
    """How each point of the plot came about: `mean +- std over seed, 3 runs each` (the runs
    that finished, when every entry of `table` has as many), or `one run each` (no axis of
    `repeats` swept, or no two runs that differ only by one)."""
    finished = {entry["runs"] - entry["failed"] for entry in table}
    if not repeats or finished == {1}:
        return "one run each"
    each = f", {finished.pop()} runs each" if len(finished) == 1 else ""
    return f"mean +- std over {' and '.join(repeats)}{each}"


def accuracy_range(table: list[dict[str, Any]]) -> tuple[float, float]:
    """The plot's val accuracy axis: the data's range (mean +- std) with a margin, not 0 to 1,
    where 0.951 and 0.954 would look equal. Within [0, 1.02]; (0, 1.02) without data."""
    if not table:
        return 0.0, 1.02
    low = min(e["val_acc_mean"] - e["val_acc_std"] for e in table)
    high = max(e["val_acc_mean"] + e["val_acc_std"] for e in table)
    margin = max((high - low) * 0.25, 0.01)  # room for the bars' labels above them
    return max(low - margin, 0.0), min(high + margin, 1.02)


def draw(table: list[dict[str, Any]], keys: list[str], repeats: list[str], curves: bool) -> Any:
    """The matplotlib Figure of the aggregated `table` (entries with a val accuracy), whose
    entries differ by `keys` and are averaged over `repeats`: learning curves when `curves`,
    else one bar per entry. The caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    how = averaged_over(table, repeats)
    if curves:
        lines = [key for key in keys if key != CURVE_AXIS]
        points: dict[str, list[tuple[int, float, float]]] = {}
        for entry in table:
            name = label(entry, lines).replace("\n", ", ")
            points.setdefault(name, []).append(
                (entry["train_images"], entry["val_acc_mean"], entry["val_acc_std"])
            )
        for name, curve in sorted(points.items()):
            curve.sort()
            xs, ys, errors = zip(*curve, strict=True)
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
        axis.set_xlabel("training images")
        axis.set_title(f"Learning curves ({how})")
    else:
        bars = axis.bar(
            range(len(table)),
            [e["val_acc_mean"] for e in table],
            yerr=[e["val_acc_std"] for e in table],
            capsize=3,
        )
        axis.bar_label(bars, fmt="%.3f", padding=2)  # the values a zoomed axis compares
        labels = [label(entry, keys) for entry in table]
        axis.set_xticks(range(len(table)), labels, rotation=30, ha="right")
        per = " x ".join(keys) or "strategy and model"
        axis.set_title(f"Validation accuracy per {per}\n({how})")
    axis.set_ylabel("val accuracy")
    axis.set_ylim(*accuracy_range(table))
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    figure.tight_layout()
    return figure
