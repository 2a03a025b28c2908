"""Confidence you can trust: temperature scaling (Guo et al. 2017, "On Calibration of Modern
Neural Networks") fitted on the val split after training, the expected calibration error (ECE)
before and after, and the reliability diagram.

Temperature scaling divides the logits by one scalar T > 0 fitted to minimise the negative log
likelihood of the val split; softmax(logits / T) keeps every image's order of classes (top-1 and
top-k never change) and only makes the probabilities more (T < 1) or less (T > 1) peaked. The
evaluation report fits T on the best checkpoint's val logits, writes it to metrics.json
(`temperature`), and `predict.py` and `export.py` read it from there (`temperature_for`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from finetune.report_images import _font

log = logging.getLogger(__name__)

ECE_BINS = 15  # Guo et al.'s bins of confidence
# A val split the model gets entirely right is fitted best by T -> 0 (ever more peaked): the
# bounds keep the temperature of a tiny or perfect val split finite.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the mean cross-entropy of `softmax(logits / T)` against
    `labels`: `logits` `(N, classes)`, `labels` `(N,)` class indices. L-BFGS over log T (so T
    stays positive), in float64. Returns 1.0 (no change, with a warning where a user would
    expect a fit) for an empty split, non-finite logits, a split the model classifies without
    a mistake (its loss falls without end as T goes to 0: every probability would become 1),
    a fit that reaches MIN_TEMPERATURE or MAX_TEMPERATURE, or one that does not lower the
    loss."""
    if not len(logits) or not torch.isfinite(logits).all():
        return 1.0
    if bool((logits.argmax(dim=1) == labels).all()):
        log.warning(
            "No temperature fitted: the model classifies all %d val images correctly, and their "
            "loss falls without end as the temperature goes to 0. Probabilities stay the "
            "model's own (temperature 1).",
            len(labels),
        )
        return 1.0
    # The evaluation runs under inference mode, whose tensors autograd cannot use: copies.
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(logits.detach().double().cpu().clone(), labels.detach().long().cpu().clone())


def _fit(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe", tolerance_grad=1e-10
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not MIN_TEMPERATURE < temperature < MAX_TEMPERATURE:
        log.warning(
            "No temperature fitted: the fit on %d val images ran to %.3g, outside [%g, %g] "
            "(too few val mistakes to measure the confidence). Probabilities stay the model's "
            "own (temperature 1).",
            len(labels),
            temperature,
            MIN_TEMPERATURE,
            MAX_TEMPERATURE,
        )
        return 1.0
    before = float(F.cross_entropy(logits, labels))
    after = float(F.cross_entropy(logits / temperature, labels))
    return temperature if math.isfinite(after) and after <= before else 1.0


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> float:
    """The ECE of `softmax(logits / temperature)`: the mean |accuracy - confidence| over
    `ECE_BINS` equal-width bins of the top-1 probability, weighted by their images
    (torchmetrics' `MulticlassCalibrationError`, norm l1)."""
    probabilities = (logits.detach().float().cpu() / temperature).softmax(dim=1)
    return float(
        multiclass_calibration_error(
            probabilities,
            labels.detach().long().cpu(),
            num_classes=logits.shape[1],
            n_bins=ECE_BINS,
            norm="l1",
        )
    )


def calibration_results(
    stage: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> dict[str, float]:
    """The metrics.json entries of one evaluated `stage`: `<stage>/ece` (the model's own
    probabilities) and `<stage>/ece_calibrated` (divided by `temperature`)."""
    return {
        f"{stage}/ece": expected_calibration_error(logits, labels),
        f"{stage}/ece_calibrated": expected_calibration_error(logits, labels, temperature),
    }


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    """Per equal-width bin of the top-1 probability (`ECE_BINS`, lower edge excluded as in
    torchmetrics): `{"images", "confidence", "accuracy"}` (means; None in an empty bin)."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, ECE_BINS - 1)
    rows = []
    for bin_index in range(ECE_BINS):
        members = index == bin_index
        count = int(members.sum())
        rows.append(
            {
                "images": count,
                "confidence": float(confidence[members].double().mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return rows


def _panel(draw: ImageDraw.ImageDraw, left: int, top: int, size: int, bins, title: str) -> None:
    """One reliability diagram: a blue bar per bin at its accuracy over the diagonal of perfect
    calibration, and a red box from there to the bin's mean confidence (above the bar:
    over-confident; inside it: under-confident)."""
    font = _font()
    draw.text((left, top - 18), title, fill="black", font=font)
    draw.rectangle((left, top, left + size, top + size), outline="black")
    width = size / ECE_BINS
    for index, row in enumerate(bins):
        if not row["images"]:
            continue
        x0, x1 = left + index * width + 1, left + (index + 1) * width - 1
        accuracy_y = top + size * (1 - row["accuracy"])
        confidence_y = top + size * (1 - row["confidence"])
        draw.rectangle((x0, accuracy_y, x1, top + size), fill=(70, 110, 200))
        low, high = sorted((accuracy_y, confidence_y))
        draw.rectangle((x0, low, x1, high), outline=(230, 90, 80), width=2)
    draw.line((left, top + size, left + size, top), fill="gray", width=1)
    for tick in (0.0, 0.5, 1.0):
        draw.text((left + tick * size - 6, top + size + 4), f"{tick:.1f}", "black", font)
        draw.text((left - 26, top + (1 - tick) * size - 6), f"{tick:.1f}", "black", font)
    draw.text((left + size // 2 - 40, top + size + 18), "confidence (top-1 p)", "gray", font)
    draw.text((left + 4, top + 4), "blue: accuracy", (70, 110, 200), font)
    draw.text((left + 4, top + 18), "red: gap to mean confidence", (230, 90, 80), font)


def reliability_image(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, title: str
) -> np.ndarray:
    """The reliability diagrams of `softmax(logits)` and `softmax(logits / temperature)` side
    by side, each titled with its ECE: bars are the accuracy of the images per confidence bin
    (perfect calibration: on the diagonal), red the gap to their mean confidence. Drawn with
    PIL (see `finetune.report_images`); `(height, width, 3)` uint8 RGB."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    size, margin = 260, 48
    canvas = Image.new("RGB", (2 * (size + 2 * margin), size + 2 * margin + 30), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=_font(14))
    for column, t in enumerate((1.0, temperature)):
        bins = reliability_bins((logits / t).softmax(dim=1), labels)
        ece = expected_calibration_error(logits, labels, t)
        name = "before (T = 1)" if column == 0 else f"after (T = {temperature:.3g})"
        left = margin + column * (size + 2 * margin)
        _panel(draw, left, margin + 20, size, bins, f"{name}: ECE {ece:.3f}")
    return np.asarray(canvas)


def temperature_for(checkpoint: str | Path) -> float:
    """The temperature fitted for `checkpoint`: metrics.json's `temperature` in its run dir
    (the folder above `checkpoints/`) when `best_checkpoint` there names this file, the one
    the temperature was fitted on; else 1.0 (the model's own probabilities)."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    if run_dir is None:
        return 1.0
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return 1.0
    fitted, best = metrics.get("temperature"), metrics.get("best_checkpoint")
    if not isinstance(fitted, int | float) or fitted <= 0:
        return 1.0
    if not best or Path(best).name != checkpoint.name:
        log.info(
            "No temperature for %s: the run's temperature was fitted on %s",
            checkpoint.name,
            Path(best).name if best else "another model",
        )
        return 1.0
    return float(fitted)
