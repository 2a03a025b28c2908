"""What the final evaluation shows: confusion matrix, per-class accuracy, misclassified images.

`EvaluationReport` is a callback that watches the evaluation of the best checkpoint after
training (Lightning's validate and test stages, not the validation inside fit). For each stage it
logs to TensorBoard a confusion-matrix image, a grid of misclassified images titled with their
true and predicted class names, and one accuracy scalar per class; the same numbers go into
`metrics.json` (`<stage>/confusion_matrix`, `<stage>/acc_per_class`). With several processes
(`trainer.devices=2`) every number and the grid cover each image of the split exactly once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchmetrics.utilities import dim_zero_cat

from finetune.data import Sample, load_rgb
from finetune.module import ClassifierModule

MAX_MISCLASSIFIED = 16
# The evaluation of the best checkpoint after fit; validation inside fit is not reported.
EVALUATION_STAGES = {TrainerFn.VALIDATING: "val", TrainerFn.TESTING: "test"}


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """The share of each true class (a row of the `(classes, classes)` confusion `matrix`)
    predicted right; None for a class without images."""
    totals = matrix.sum(dim=1)
    return [float(matrix[i, i] / totals[i]) if totals[i] > 0 else None for i in range(len(matrix))]


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def confusion_image(matrix: torch.Tensor, class_names: list[str], title: str) -> np.ndarray:
    """The confusion matrix as an RGB array: rows true classes, columns predicted, shade by the
    share of the row, counts written in the cells. Drawn with PIL: matplotlib's import alone
    would cost a cached linear probe a fifth of its run time."""
    n = len(class_names)
    cell = max(12, min(48, 720 // max(n, 1)))
    font = _font(11)
    names = [name[:24] for name in class_names]
    margin_left = 16 + 7 * max(len(name) for name in names)
    margin_top = 40 + 7 * max(len(name) for name in names)
    width, height = margin_left + max(n * cell, 230) + 10, margin_top + n * cell + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=_font(14))
    shares = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    for true in range(n):
        for pred in range(n):
            share = float(shares[true, pred])
            colour = tuple(int(255 - share * (255 - c)) for c in (8, 48, 107))  # white -> blue
            x, y = margin_left + pred * cell, margin_top + true * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(220, 220, 220))
            if n <= 20:
                text_colour = "white" if share > 0.5 else "black"
                draw.text(
                    (x + 3, y + cell // 3),
                    str(int(matrix[true, pred])),
                    fill=text_colour,
                    font=font,
                )
    for index, name in enumerate(names):
        draw.text((6, margin_top + index * cell + cell // 3), name, fill="black", font=font)
        label = Image.new("RGB", (7 * len(name) + 8, 14), "white")
        ImageDraw.Draw(label).text((0, 0), name, fill="black", font=font)
        rotated = label.rotate(90, expand=True)
        canvas.paste(
            rotated, (margin_left + index * cell + cell // 3, margin_top - rotated.height - 4)
        )
    draw.text(
        (margin_left, height - 18), "predicted ->   (rows: true class)", fill="gray", font=font
    )
    return np.asarray(canvas)


def misclassified_image(
    mistakes: list[tuple[str, int, int]], class_names: list[str], title: str
) -> np.ndarray:
    """Up to 16 misclassified images in a grid, each titled with its true and predicted class."""
    columns, thumb, caption = 4, 160, 34
    rows = max(1, -(-len(mistakes) // columns))
    canvas = Image.new(
        "RGB", (columns * (thumb + 8) + 8, 28 + rows * (thumb + caption + 8)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=_font(14))
    font = _font(11)
    for position, (path, true, pred) in enumerate(mistakes):
        x = 8 + (position % columns) * (thumb + 8)
        y = 28 + (position // columns) * (thumb + caption + 8)
        picture = load_rgb(path)
        picture.thumbnail((thumb, thumb))
        canvas.paste(picture, (x + (thumb - picture.width) // 2, y + (thumb - picture.height) // 2))
        draw.text(
            (x, y + thumb + 2), f"true: {class_names[true][:22]}", fill="darkgreen", font=font
        )
        draw.text(
            (x, y + thumb + 17), f"pred: {class_names[pred][:22]}", fill="firebrick", font=font
        )
    return np.asarray(canvas)


class Predictions(Metric):
    """Each evaluated image's position in its split with its true and predicted class.

    `update(positions, labels, preds)` takes three `(batch,)` integer tensors; `compute()`
    returns an `(images, 3)` long tensor of rows `(position, true, predicted)` ordered by
    position, from every process: with several processes torchmetrics gathers each one's rows
    (its `cat` reduction accepts shares of different lengths), so every image counts once.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, positions: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> None:
        self.rows.append(torch.stack([positions, labels, preds], dim=1).long())

    def compute(self) -> torch.Tensor:
        # A list on one process; one tensor once torchmetrics has gathered every process's.
        rows = dim_zero_cat(self.rows) if len(self.rows) else torch.empty(0, 3, dtype=torch.long)
        return rows[rows[:, 0].argsort()]


def evaluation_order(loader: Any) -> list[int]:
    """The split positions this process's evaluation `loader` yields, in order: all of them with
    one process, its share of them with several (`finetune.data.loading.evaluation_sampler`)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
    return list(sampler)


class EvaluationReport(pl.Callback):
    """Collects predictions of the post-training validate/test runs and reports them. With
    several processes each evaluates a share of the images; the report gathers every share, and
    the first process writes it."""

    def __init__(self, class_names: list[str], samples: dict[str, list[Sample] | None]) -> None:
        self.class_names = list(class_names)
        self.samples = samples  # per stage, in split order: the rows' positions index them
        self.results: dict[str, Any] = {}
        self._predictions = Predictions()
        self._order: list[int] = []  # split positions of this process's batches, in order
        self._seen = 0

    def _stage(self, trainer: pl.Trainer) -> str | None:
        return EVALUATION_STAGES.get(trainer.state.fn)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(trainer)
        if stage is None:
            return
        # After fit, Lightning may still hand out fit's val loader: the data module built it
        # by the same rule, so its order is the same.
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        self._order, self._seen = evaluation_order(loaders), 0
        # On the module's device: NCCL gathers device tensors only.
        self._predictions = self._predictions.to(pl_module.device)
        self._predictions.reset()

    on_validation_epoch_start = _start
    on_test_epoch_start = _start

    def _collect(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._stage(trainer) is None or outputs is None:
            return
        count = len(outputs)
        positions = self._order[self._seen : self._seen + count]
        self._seen += count
        self._predictions.update(
            torch.tensor(positions, device=outputs.device), batch[1].detach(), outputs.detach()
        )

    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(trainer)
        if stage is None:
            return
        rows = self._predictions.compute().cpu()  # every process takes part in the gather
        if not len(rows):
            return
        positions, labels, preds = rows.unbind(dim=1)
        matrix = multiclass_confusion_matrix(preds, labels, len(self.class_names))
        accuracy = per_class_accuracy(matrix)
        self.results[f"{stage}/confusion_matrix"] = matrix.tolist()
        self.results[f"{stage}/acc_per_class"] = dict(zip(self.class_names, accuracy, strict=True))
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        writer, step = loggers[0].experiment, trainer.global_step
        writer.add_image(
            f"{stage}/confusion_matrix",
            confusion_image(matrix, self.class_names, f"{stage} confusion matrix"),
            step,
            dataformats="HWC",
        )
        for name, value in zip(self.class_names, accuracy, strict=True):
            if value is not None:
                # under best/ like the re-validation's other numbers: not a point of val/*
                writer.add_scalar(
                    f"{ClassifierModule.EVALUATION_TAG}{stage}/acc_per_class/{name}", value, step
                )
        samples = self.samples.get(stage) or []
        wrong = torch.nonzero(preds != labels).flatten().tolist()
        mistakes = [(samples[int(positions[i])][0], int(labels[i]), int(preds[i])) for i in wrong][
            :MAX_MISCLASSIFIED
        ]
        if mistakes:
            title = f"{stage}: {len(wrong)} misclassified of {len(labels)} (first {len(mistakes)})"
            writer.add_image(
                f"{stage}/misclassified",
                misclassified_image(mistakes, self.class_names, title),
                step,
                dataformats="HWC",
            )
        writer.flush()

    on_validation_epoch_end = _report
    on_test_epoch_end = _report
