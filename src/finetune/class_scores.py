"""Scores per class and their means, from an evaluation's predictions: precision, recall and F1
of each class, balanced accuracy and the macro and weighted means, by torchmetrics (the module
logs `balanced_acc` and `macro_f1` with the same definitions), and the readable
`classification_report.txt` (scikit-learn's `classification_report` layout, with a balanced
accuracy line).

`preds` and `labels` are `(images,)` integer tensors of predicted and true classes in
`[0, classes)`; with several processes the caller gathers every process's first
(`finetune.reports.Predictions`), so every image counts once.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

SCORES = {"precision": multiclass_precision, "recall": multiclass_recall, "f1": multiclass_f1_score}
DIGITS = 4  # as many as the closing line and the sweep summary show


def per_class_scores(
    stage: str, preds: torch.Tensor, labels: torch.Tensor, class_names: list[str]
) -> dict[str, dict[str, float | None]]:
    """`<stage>/precision_per_class`, `<stage>/recall_per_class` and `<stage>/f1_per_class`:
    class name -> score in [0, 1], in label order; None for a class without images in the
    split (nothing to measure; a class with images that is never predicted has precision 0)."""
    classes = len(class_names)
    support = torch.bincount(labels, minlength=classes).tolist()
    results = {}
    for name, score in SCORES.items():
        values = score(preds, labels, classes, average="none").tolist()
        results[f"{stage}/{name}_per_class"] = {
            class_name: (float(value) if count else None)
            for class_name, value, count in zip(class_names, values, support, strict=True)
        }
    return results


def classification_report(
    preds: torch.Tensor, labels: torch.Tensor, class_names: list[str], title: str = ""
) -> str:
    """The text of scikit-learn's `classification_report` (precision, recall, f1-score and
    support per class; accuracy; macro and weighted averages), 4 digits, with a `balanced
    accuracy` line after accuracy, under `title` when given. The numbers are torchmetrics'
    (macro means leave out a class that is neither in the labels nor predicted)."""
    classes = len(class_names)
    support = torch.bincount(labels, minlength=classes).tolist()
    total = len(labels)
    per_class = {
        name: score(preds, labels, classes, average="none") for name, score in SCORES.items()
    }

    def means(average: str) -> list[float]:
        return [float(score(preds, labels, classes, average=average)) for score in SCORES.values()]

    width = max(len(name) for name in [*class_names, "balanced accuracy"])
    header = f"{'':>{width}} " + "".join(
        f" {cell:>9}" for cell in ("precision", "recall", "f1-score", "support")
    )

    def row(name: str, values: list[float | None], count: int) -> str:
        cells = "".join(f" {'':>9}" if v is None else f" {v:>9.{DIGITS}f}" for v in values)
        return f"{name:>{width}} {cells} {count:>9}"

    lines = [title] if title else []
    lines += [header, ""]
    for index, name in enumerate(class_names):
        values = [float(per_class[score][index]) for score in SCORES]
        lines.append(row(name, values, support[index]))
    accuracy = float(multiclass_accuracy(preds, labels, classes, average="micro"))
    balanced = float(multiclass_accuracy(preds, labels, classes, average="macro"))
    lines += [
        "",
        row("accuracy", [None, None, accuracy], total),
        row("balanced accuracy", [None, None, balanced], total),
        row("macro avg", means("macro"), total),
        row("weighted avg", means("weighted"), total),
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
