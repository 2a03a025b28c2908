"""What the final evaluation shows: confusion matrix, per-class accuracy, misclassified images.

`EvaluationReport` is a callback that watches the evaluation of the best checkpoint after
training (Lightning's validate and test stages, not the validation inside fit). For each stage it
logs to TensorBoard a confusion-matrix image, a grid of misclassified images titled with their
true and predicted class names, and one accuracy scalar per class; the same numbers go into
`metrics.json` (`<stage>/confusion_matrix`, `<stage>/acc_per_class`).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn

from finetune.data import Sample

log = logging.getLogger(__name__)

MAX_MISCLASSIFIED = 16
# The evaluation of the best checkpoint after fit; validation inside fit is not reported.
EVALUATION_STAGES = {TrainerFn.VALIDATING: "val", TrainerFn.TESTING: "test"}


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted ones."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    totals = matrix.sum(dim=1)
    return [float(matrix[i, i] / totals[i]) if totals[i] > 0 else None for i in range(len(matrix))]


def confusion_figure(matrix: torch.Tensor, class_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(max(3.0, 0.35 * len(class_names) + 2), 16)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix.numpy(), cmap="Blues")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 6 else 0)
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    if len(class_names) <= 20:
        for true in ticks:
            for pred in ticks:
                axis.text(pred, true, int(matrix[true, pred]), ha="center", va="center")
    figure.tight_layout()
    return figure


def misclassified_figure(mistakes: list[tuple[str, int, int]], class_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = max(1, -(-len(mistakes) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (path, true, pred) in zip(axes.flat, mistakes, strict=False):
        with Image.open(path) as image:
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((160, 160))
        axis.imshow(thumbnail)
        axis.set_title(f"true: {class_names[true]}\npred: {class_names[pred]}", fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


class EvaluationReport(pl.Callback):
    """Collects predictions of the post-training validate/test runs and reports them."""

    def __init__(self, class_names: list[str], samples: dict[str, list[Sample] | None]) -> None:
        self.class_names = list(class_names)
        self.samples = samples  # per stage, in loader order (evaluation loaders never shuffle)
        self.results: dict[str, Any] = {}
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _stage(self, trainer: pl.Trainer) -> str | None:
        return EVALUATION_STAGES.get(trainer.state.fn)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._preds, self._labels = [], []

    on_validation_epoch_start = _start
    on_test_epoch_start = _start

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._stage(trainer) is None or outputs is None:
            return
        self._preds.append(outputs.detach().cpu())
        self._labels.append(batch[1].detach().cpu())

    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(trainer)
        if stage is None or not self._preds:
            return
        preds, labels = torch.cat(self._preds), torch.cat(self._labels)
        matrix = confusion_matrix(labels, preds, len(self.class_names))
        accuracy = per_class_accuracy(matrix)
        self.results[f"{stage}/confusion_matrix"] = matrix.tolist()
        self.results[f"{stage}/acc_per_class"] = dict(zip(self.class_names, accuracy, strict=True))
        if not trainer.is_global_zero or trainer.world_size > 1:
            return  # each rank saw a shard; the run's own numbers come from the metrics
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        writer, step = loggers[0].experiment, trainer.global_step
        writer.add_figure(
            f"{stage}/confusion_matrix",
            confusion_figure(matrix, self.class_names, f"{stage} confusion matrix"),
            step,
        )
        for name, value in zip(self.class_names, accuracy, strict=True):
            if value is not None:
                writer.add_scalar(f"{stage}/acc_per_class/{name}", value, step)
        samples = self.samples.get(stage) or []
        wrong = torch.nonzero(preds != labels).flatten().tolist()
        mistakes = [
            (samples[i][0], int(labels[i]), int(preds[i])) for i in wrong if i < len(samples)
        ][:MAX_MISCLASSIFIED]
        if mistakes:
            title = f"{stage}: {len(wrong)} misclassified of {len(labels)} (first {len(mistakes)})"
            writer.add_figure(
                f"{stage}/misclassified",
                misclassified_figure(mistakes, self.class_names, title),
                step,
            )
        writer.flush()

    on_validation_epoch_end = _report
    on_test_epoch_end = _report
