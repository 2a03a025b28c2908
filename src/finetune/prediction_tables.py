"""What `predict.py` prints and writes from its `Predictions`: the top-k table,
predictions.csv, and the accuracy and confusion matrix of images from class folders."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.atomic import atomic_write


@dataclass
class Predictions:
    """`probabilities[i]` (softmax over the classes, float32) belongs to `files[i]`; the files
    that could not be read are in `unreadable` (path -> reason), not in `files`. `embeddings`
    (`(N, D)` float32, row i of `files[i]`) when they were asked for (`finetune.embeddings`)."""

    files: list[Path]
    probabilities: torch.Tensor  # (N, classes)
    unreadable: dict[Path, str]
    embeddings: torch.Tensor | None = None


def top_k(predictions: Predictions, class_names: Sequence[str], k: int) -> list[list[Any]]:
    """Rows `[path, label_1, score_1, ..., label_k, score_k]`, best class first."""
    k = min(k, len(class_names))
    scores, indices = predictions.probabilities.topk(k, dim=1)
    rows = []
    for path, row_scores, row_indices in zip(predictions.files, scores, indices, strict=True):
        row: list[Any] = [str(path)]
        for score, index in zip(row_scores.tolist(), row_indices.tolist(), strict=True):
            row += [class_names[index], round(score, 6)]
        rows.append(row)
    return rows


def write_csv(path: str | Path, rows: list[list[Any]], k: int, truth: list[str] | None) -> Path:
    """predictions.csv: `path, label_1, score_1, ..., label_k, score_k[, true_label]`."""
    header = ["path"] + [
        f"{kind}_{rank}" for rank in range(1, k + 1) for kind in ("label", "score")
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header + (["true_label"] if truth is not None else []))
    for index, row in enumerate(rows):
        writer.writerow(row + ([truth[index]] if truth is not None else []))
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue().encode()))


def format_table(rows: list[list[Any]]) -> str:
    """The top-k rows as aligned text: one line per image, `label score` pairs."""
    paths = [row[0] for row in rows]
    width = min(max((len(p) for p in paths), default=4), 80)
    lines = [f"{'image':<{width}}  top classes (probability)"]
    for row in rows:
        pairs = "  ".join(
            f"{label} {score:.4f}" for label, score in zip(row[1::2], row[2::2], strict=True)
        )
        lines.append(f"{row[0]:<{width}}  {pairs}")
    return "\n".join(lines)


def confusion(
    predictions: Predictions, labels: dict[Path, int], classes: int
) -> tuple[float, torch.Tensor, int]:
    """Accuracy, the confusion matrix `(classes, classes)` (rows: true class, columns:
    predicted) and the number of images counted, over the labelled predictions."""
    pairs = [
        (labels[path], int(row.argmax()))
        for path, row in zip(predictions.files, predictions.probabilities, strict=True)
        if path in labels
    ]
    matrix = torch.zeros(classes, classes, dtype=torch.long)
    for true, predicted in pairs:
        matrix[true, predicted] += 1
    correct = int(matrix.diagonal().sum())
    return (correct / len(pairs) if pairs else 0.0), matrix, len(pairs)


def format_confusion(matrix: torch.Tensor, class_names: Sequence[str]) -> str:
    """The confusion matrix as aligned text: a row per true class, a column per prediction."""
    corner = "true \\ predicted"
    first = max(len(corner), *(len(n) for n in class_names))
    width = max(len(str(int(matrix.max()))), *(len(n) for n in class_names))
    lines = [f"{corner:<{first}}  " + "  ".join(f"{n:>{width}}" for n in class_names)]
    for name, row in zip(class_names, matrix.tolist(), strict=True):
        lines.append(f"{name:<{first}}  " + "  ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
