"""What the class counts of a run's data say before training: the counts of train and val, the
imbalance ratio (largest over smallest training class), what `data.class_weights=balanced` would
change when the ratio is high and no weighting is set, and the classes with too few validation
images to measure.

A large class hides a small one in top-1 accuracy: a model that never predicts a class of 2%
of the images loses only 2% of accuracy. The run says so at its start, when it can still be
changed, rather than leaving the user to find it in the per-class numbers after training.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from lightning_utilities.core.rank_zero import rank_zero_only  # the object Lightning sets .rank on
from sklearn.utils.class_weight import compute_class_weight

log = logging.getLogger(__name__)

# From this ratio of the largest to the smallest training class on, the run suggests weighting.
IMBALANCE_RATIO = 3.0
# A class with fewer validation images than this has a recall that moves in steps of 1/images.
FEW_VAL_IMAGES = 5
# Up to this many classes, every class's counts are listed; above, only the extremes.
LISTED_CLASSES = 12
# Classes with few validation images named one per line; the rest are counted.
NAMED_FEW = 10


def class_counts(samples: Sequence[tuple[str, int]], classes: int) -> list[int]:
    """Images per class index `0 .. classes - 1` of `(path, class index)` samples."""
    counted = Counter(label for _, label in samples)
    return [counted.get(index, 0) for index in range(classes)]


def imbalance_ratio(train_counts: Sequence[int]) -> float:
    """The largest training class's images over the smallest's, among classes with images
    (1.0 for balanced data; 1.0 when no class or one class has images)."""
    present = [count for count in train_counts if count > 0]
    return max(present) / min(present) if present else 1.0


def balanced_weights(train_counts: Sequence[int]) -> list[float]:
    """scikit-learn's `class_weight="balanced"` of the training classes with images:
    images / (classes x images of the class); 0.0 for a class without images."""
    present = [index for index, count in enumerate(train_counts) if count > 0]
    labels = np.repeat(present, [train_counts[index] for index in present])
    weights = compute_class_weight("balanced", classes=np.array(present), y=labels)
    by_class = dict(zip(present, weights.tolist(), strict=True))
    return [by_class.get(index, 0.0) for index in range(len(train_counts))]


def class_balance_lines(
    class_names: Sequence[str],
    train_counts: Sequence[int],
    val_counts: Sequence[int],
    class_weights: Any = None,
    sampler: str | None = None,
    folds: int | None = None,
) -> list[str]:
    """The lines a run logs at its start about its classes (see the module docstring):
    the counts, the ratio, the weighting hint (ratio >= `IMBALANCE_RATIO`, `class_weights`
    None or "none" and no balanced `sampler`) and each class with 1 to `FEW_VAL_IMAGES - 1` validation images.
    `train_counts`, `val_counts`: images per class, in label order."""
    names = list(class_names)
    ratio = imbalance_ratio(train_counts)
    present = [index for index, count in enumerate(train_counts) if count > 0]
    largest = max(present, key=lambda index: train_counts[index]) if present else 0
    smallest = min(present, key=lambda index: train_counts[index]) if present else 0
    even = len(present) == len(names) and len({train_counts[i] for i in present}) == 1
    if len(names) > LISTED_CLASSES and even:
        counts = (
            f"{len(names)} classes, every one with {train_counts[0]} training images, "
            f"{sum(val_counts)} val images in all"
        )
    elif len(names) <= LISTED_CLASSES:
        counts = ", ".join(
            f"{name} {train} / {val}"
            for name, train, val in zip(names, train_counts, val_counts, strict=True)
        )
    else:
        counts = (
            f"{len(names)} classes, {sum(train_counts)} / {sum(val_counts)} images, largest "
            f"{names[largest]} {train_counts[largest]} / {val_counts[largest]}, smallest "
            f"{names[smallest]} {train_counts[smallest]} / {val_counts[smallest]}"
        )
    balance = (
        "Every class has as many training images (imbalance ratio 1.0)."
        if even
        else f"Imbalance ratio {ratio:.1f} (largest / smallest training class: "
        f"{names[largest] if present else '-'} / {names[smallest] if present else '-'})."
    )
    lines = [f"Class counts (train / val): {counts}. {balance}"]
    if ratio >= IMBALANCE_RATIO and class_weights in (None, "none") and sampler != "balanced":
        weights = balanced_weights(train_counts)
        lines.append(
            f"The largest training class has {ratio:.1f} times the images of the smallest, and "
            "every image weighs alike in the loss: the model leans to the large classes, and "
            "top-1 accuracy hides a small class it never predicts. data.class_weights=balanced "
            "would weight each class's loss by images / (classes x its images) (scikit-learn's "
            f"'balanced'): {names[smallest]} x{weights[smallest]:.2f}, {names[largest]} "
            f"x{weights[largest]:.2f}. Compare runs by val/balanced_acc or val/macro_f1 and "
            "choose the checkpoint by one of them: selection.metric=val/macro_f1."
        )
    few = [
        (name, count)
        for name, count in zip(names, val_counts, strict=True)
        if 0 < count < FEW_VAL_IMAGES
    ]
    for name, count in few[:NAMED_FEW]:
        noun = "image" if count == 1 else "images"
        steps = "is 0 or 1" if count == 1 else f"moves in steps of {1 / count:.2g}"
        lines.append(f"Class '{name}' has {count} val {noun}: its recall {steps}.")
    if len(few) > NAMED_FEW:
        lines.append(f"... and {len(few) - NAMED_FEW} more classes with 1 to 4 val images.")
    if few:
        better = "more val images (data.val_fraction)" + (
            "" if folds else " or k-fold cross-validation (data.folds=5)"
        )
        lines.append(
            f"Their numbers are too coarse to compare runs by: {better} measure them better."
        )
    return lines


@rank_zero_only
def log_class_balance(
    splits: Any, class_weights: Any = None, sampler: str | None = None, folds: int | None = None
) -> None:
    """Log `class_balance_lines` of a `finetune.data.DatasetSplits` (its train and val
    splits); the hint and the few-images lines as warnings."""
    classes = len(splits.class_names)
    lines = class_balance_lines(
        splits.class_names,
        class_counts(splits.train, classes),
        class_counts(splits.val, classes),
        class_weights,
        sampler,
        folds,
    )
    log.info(lines[0])
    for line in lines[1:]:
        log.warning(line)
