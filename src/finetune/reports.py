"""What the final evaluation shows: confusion matrix, per-class accuracy, the worst classes,
the most confused pairs, the images of highest loss, calibration.

`EvaluationReport` is a callback that watches the evaluation of the best checkpoint after
training (Lightning's validate and test stages, not the validation inside fit). For each stage it
logs to TensorBoard a confusion-matrix image (above 40 classes, a sorted view of the worst
classes and their top confusions: `finetune.report_images`), a grid of the images of highest
loss captioned with their true and predicted class and p(true) (`finetune.top_losses`) and
the same grid with their class activation maps (`finetune.cams`), the reliability diagrams
before and after the temperature fitted on val (`finetune.calibration`), one accuracy scalar
per class, and as text the classes ranked worst first and the most confused pairs; the same
numbers go into `metrics.json` (`stage_results`, the top losses, the temperature and the
calibration errors), with precision, recall and F1 per class (`finetune.class_scores`), and
the text of `classification_report.txt` (`classification_text`). Top-1 and top-5 accuracy,
balanced accuracy and macro-F1 are the module's own metrics (`<stage>/acc`,
`<stage>/acc_top5`, `<stage>/balanced_acc`, `<stage>/macro_f1`). With several processes
(`trainer.devices=2`) every number and the grids
cover each image of the split exactly once.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchmetrics.utilities import dim_zero_cat

from finetune.calibration import calibration_results, fit_temperature, reliability_image
from finetune.class_scores import classification_report, per_class_scores
from finetune.confusion import class_ranking, confused_pairs, per_class_accuracy
from finetune.data import Sample
from finetune.module import ClassifierModule
from finetune.report_images import confusion_image
from finetune.top_losses import top_losses, top_losses_cam_image, top_losses_image

__all__ = [  # the drawing and the numbers live in their own modules; reports ties them together
    "EvaluationReport",
    "Predictions",
    "best_checkpoint_line",
    "confusion_image",
    "evaluation_order",
    "per_class_accuracy",
    "stage_results",
    "warn_partial_evaluations",
]

log = logging.getLogger(__name__)
# The evaluation of the best checkpoint after fit; validation inside fit is not reported.
EVALUATION_STAGES = {TrainerFn.VALIDATING: "val", TrainerFn.TESTING: "test"}


def stage_results(stage: str, matrix: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """The metrics.json entries of one evaluated `stage` ("val" or "test") from its confusion
    `matrix` `(classes, classes)`: `<stage>/images` (how many images every number of the stage
    covers: fewer than the split under `trainer.limit_*_batches`), `<stage>/confusion_matrix`
    (nested lists),
    `<stage>/acc_per_class` (name -> accuracy or None, label order),
    `<stage>/acc_per_class_sorted` (`finetune.confusion.class_ranking`: worst first) and
    `<stage>/confused_pairs` (`finetune.confusion.confused_pairs`: most frequent first)."""
    accuracy = per_class_accuracy(matrix)
    return {
        f"{stage}/images": int(matrix.sum()),
        f"{stage}/confusion_matrix": matrix.tolist(),
        f"{stage}/acc_per_class": dict(zip(class_names, accuracy, strict=True)),
        f"{stage}/acc_per_class_sorted": class_ranking(matrix, class_names),
        f"{stage}/confused_pairs": confused_pairs(matrix, class_names),
    }


def calibration_line(stage: str, temperature: float, before: float, after: float) -> str | None:
    """The log line of a fitted temperature and the expected calibration error it gives `stage`
    (`before`, `after`: ECE at temperature 1 and at `temperature`); None when no temperature
    was fitted (1.0: `fit_temperature` has said why)."""
    if temperature == 1.0:
        return None
    line = (
        f"{stage}: temperature {temperature:.3g} (fitted on val's loss) takes the expected "
        f"calibration error from {before:.4f} to {after:.4f}"
    )
    if after > before:
        line += (
            " (the temperature minimises the val loss, not the binned ECE, which a few images "
            "per bin can move either way)"
        )
    return line


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """`rows` (dicts with the same keys) as a Markdown table, which TensorBoard's TEXT tab
    draws; floats as percentages."""
    if not rows:
        return "(none)"
    keys = list(rows[0])
    cells = [[f"{v:.1%}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    lines = [keys, ["---"] * len(keys), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


class Predictions(Metric):
    """Each evaluated image's position in its split with its true class and its logits.

    `update(positions, labels, logits)` takes two `(batch,)` integer tensors and the
    `(batch, classes)` logits; `compute()` returns an `(images, 3)` long tensor of rows
    `(position, true, predicted)` and the float32 `(images, classes)` logits, both ordered by
    position, from every process: with several processes torchmetrics gathers each one's rows
    (its `cat` reduction accepts shares of different lengths), so every image counts once.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("logits", default=[], dist_reduce_fx="cat")

    def update(self, positions: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        preds = logits.argmax(dim=1)
        self.rows.append(torch.stack([positions, labels, preds], dim=1).long())
        self.logits.append(logits.float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        # A list on one process; one tensor once torchmetrics has gathered every process's.
        if not len(self.rows):
            return torch.empty(0, 3, dtype=torch.long), torch.empty(0, 0)
        rows, logits = dim_zero_cat(self.rows), dim_zero_cat(self.logits)
        order = rows[:, 0].argsort()
        return rows[order], logits[order]


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
        self.report_texts: dict[str, str] = {}  # stage -> its classification report
        self._predictions = Predictions()
        self.temperature = 1.0  # fitted on the val logits (finetune.calibration)
        self._order: list[int] = []  # split positions of this process's batches, in order
        self._seen = 0

    def classification_text(self) -> str:
        """The classification reports of the evaluated stages (val, then test), for
        `classification_report.txt`; "" before any evaluation."""
        reports = [self.report_texts[s] for s in ("val", "test") if s in self.report_texts]
        return "\n".join(reports)

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
        rows, logits = self._predictions.compute()  # every process takes part in the gather
        if not len(rows):
            return
        positions, labels, preds = rows.cpu().unbind(dim=1)
        logits = logits.cpu()
        matrix = multiclass_confusion_matrix(preds, labels, len(self.class_names))
        results = stage_results(stage, matrix, self.class_names)
        if stage == "val":  # the test split, when there is one, is scored with val's T
            self.temperature = fit_temperature(logits, labels)
            results["temperature"] = self.temperature
        results |= calibration_results(stage, logits, labels, self.temperature)
        line = calibration_line(
            stage, self.temperature, results[f"{stage}/ece"], results[f"{stage}/ece_calibrated"]
        )
        if trainer.is_global_zero and line:
            log.info("%s", line)
        samples = self.samples.get(stage) or []
        if samples:  # the positions index the split's samples
            paths = [samples[int(position)][0] for position in positions]
            results[f"{stage}/top_losses"] = top_losses(paths, labels, logits, self.class_names)
        self.results |= results | per_class_scores(stage, preds, labels, self.class_names)
        title = f"{stage}: {len(labels)} images"
        self.report_texts[stage] = classification_report(preds, labels, self.class_names, title)
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
        title = f"{stage} reliability: accuracy per confidence bin ({len(labels)} images)"
        writer.add_image(
            f"{stage}/reliability",
            reliability_image(logits, labels, self.temperature, title),
            step,
            dataformats="HWC",
        )
        # under best/ like the re-validation's other numbers: not a point of val/*
        for key in ("acc", "precision", "recall", "f1"):
            for name, value in self.results[f"{stage}/{key}_per_class"].items():
                if value is not None:
                    tag = f"{ClassifierModule.EVALUATION_TAG}{stage}/{key}_per_class/{name}"
                    writer.add_scalar(tag, value, step)
        for key in ("acc_per_class_sorted", "confused_pairs"):
            writer.add_text(f"{stage}/{key}", markdown_table(results[f"{stage}/{key}"]), step)
        report = self.report_texts[stage].replace("\n", "\n    ")  # a Markdown code block
        writer.add_text(f"{stage}/classification_report", f"    {report}", step)
        shown = results.get(f"{stage}/top_losses")
        if shown:
            wrong = int((preds != labels).sum())
            title = f"{stage}: the {len(shown)} highest losses of {len(labels)} ({wrong} wrong)"
            writer.add_image(
                f"{stage}/top_losses", top_losses_image(shown, title), step, dataformats="HWC"
            )
            self._log_cams(writer, step, stage, shown, pl_module, title)
        writer.flush()

    @staticmethod
    def _log_cams(writer, step: int, stage: str, shown, pl_module, title: str) -> None:
        """The top losses' class activation maps (`<stage>/top_losses_cam`): a picture for a
        finished run, never a reason to fail it, so an error is a warning."""
        try:
            grid = top_losses_cam_image(shown, pl_module.network, f"{title}: Grad-CAM")
        except Exception as error:  # a family pytorch-grad-cam cannot serve, ...
            log.warning("No class activation maps of the top losses: %s", error)
            return
        writer.add_image(f"{stage}/top_losses_cam", grid, step, dataformats="HWC")

    on_validation_epoch_end = _report
    on_test_epoch_end = _report


# The numbers of each evaluated stage the closing line gives, after the selection metric.
CLOSING_NUMBERS = ("acc", "balanced_acc", "macro_f1")


def best_checkpoint_line(metrics: dict[str, Any]) -> str:
    """One line: the metric that chose the best checkpoint (`selection_metric`) with its value,
    the checkpoint's epoch, and per evaluated stage its accuracy, balanced accuracy and
    macro-F1, with the number of images they cover when that is not the whole split
    (`partial_evaluations`). Without a checkpoint, the final weights' numbers."""
    partial = partial_evaluations(metrics)
    numbers = "; ".join(
        f"{stage}/"
        + ", ".join(
            f"{name} {metrics[f'{stage}/{name}']:.4f}"
            for name in CLOSING_NUMBERS
            if f"{stage}/{name}" in metrics
        )
        + partial.get(stage, "")
        for stage in ("val", "test")
        if f"{stage}/acc" in metrics
    )
    selection = metrics.get("selection_metric", "val/acc")
    if metrics.get("best_checkpoint"):
        chosen = metrics.get(selection)
        what = f"Best checkpoint by {selection}" + ("" if chosen is None else f" {chosen:.4f}")
    else:
        what = "Final weights (no checkpoint)"
    epoch = metrics.get("best_epoch")
    when = "the linear probe, before training on" if epoch == -1 else f"epoch {epoch}"
    return f"{what}: {when}; {numbers}."


def partial_evaluations(metrics: dict[str, Any]) -> dict[str, str]:
    """Stage -> " on N of M images" for each evaluated stage whose numbers cover fewer images
    than its split holds (`trainer.limit_val_batches` / `limit_test_batches`, `overfit_batches`,
    `fast_dev_run`: a smoke test's numbers, not the split's accuracy)."""
    sizes = metrics.get("split_sizes") or {}
    partial = {}
    for stage in ("val", "test"):
        images, size = metrics.get(f"{stage}/images"), sizes.get(stage)
        if images is not None and size is not None and images < size:
            partial[stage] = f" on {images} of {size} images"
    return partial


def warn_partial_evaluations(metrics: dict[str, Any]) -> None:
    """Log one warning per stage of `partial_evaluations(metrics)`: its numbers are a smoke
    test's, not the split's."""
    for stage, images in partial_evaluations(metrics).items():
        log.warning(
            f"The {stage} numbers cover only some of its images ({stage}/acc{images}): the "
            f"trainer's limit_{stage}_batches, overfit_batches or fast_dev_run cut the "
            f"evaluation. They are a smoke test's, not the {stage} split's accuracy; without "
            "those options every image counts."
        )
