"""Numbers read off a confusion matrix, for reports that scale to many classes: accuracy per
class, the classes ranked worst first, and the most confused pairs. A confusion `matrix` here
is a `(classes, classes)` integer tensor, rows true classes, columns predicted
(`torchmetrics.functional.classification.multiclass_confusion_matrix`)."""

from __future__ import annotations

from typing import Any

import torch

MAX_CONFUSED_PAIRS = 20  # the pairs metrics.json and TensorBoard list


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """The share of each true class (a row of `matrix`) predicted right; None for a class
    without images."""
    totals = matrix.sum(dim=1)
    return [float(matrix[i, i] / totals[i]) if totals[i] > 0 else None for i in range(len(matrix))]


def class_ranking(matrix: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    """Every class with images, worst accuracy first (ties in label order), as
    `{"class": name, "acc": share right in [0, 1], "images": its images}`."""
    totals = matrix.sum(dim=1).tolist()
    rows = [
        {"class": name, "acc": acc, "images": int(total)}
        for name, acc, total in zip(class_names, per_class_accuracy(matrix), totals, strict=True)
        if acc is not None
    ]
    return sorted(rows, key=lambda row: row["acc"])  # stable: ties keep label order


def confused_pairs(
    matrix: torch.Tensor, class_names: list[str], limit: int | None = MAX_CONFUSED_PAIRS
) -> list[dict[str, Any]]:
    """The `limit` (None: all) most frequent mistakes, as `{"true": name, "predicted": name, "count":
    images, "share": count / images of the true class}`: by count, then share, then label
    order. Only pairs with at least one image."""
    totals = matrix.sum(dim=1).tolist()
    wrong = matrix.clone()
    wrong.fill_diagonal_(0)
    pairs = [
        (int(wrong[t, p]), int(wrong[t, p]) / totals[t], t, p)
        for t, p in torch.nonzero(wrong).tolist()
    ]
    pairs.sort(key=lambda pair: (-pair[0], -pair[1], pair[2], pair[3]))
    return [
        {"true": class_names[t], "predicted": class_names[p], "count": count, "share": share}
        for count, share, t, p in pairs[:limit]
    ]
