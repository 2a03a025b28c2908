"""K-fold cross-validation for small data: train and val pooled and cut into K stratified folds
(scikit-learn's `StratifiedKFold`: each class's images spread over the folds so that its counts
differ by at most one), fold `i` validating and the others training. A test split never enters
a fold. Byte-identical copies go to the fold of their original.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold

from finetune.data.duplicates import file_digests, originals
from finetune.data.loading import DatasetSplits, Sample
from finetune.errors import FinetuneError


def check_fold(folds: int | None, fold: int) -> None:
    """Raise `FinetuneError` when `fold` is not one of the `folds` (0 to folds - 1)."""
    if folds is not None and not 0 <= fold < folds:
        raise FinetuneError(
            f"data.fold={fold} is not one of the {folds} folds (data.folds={folds}). Fix: "
            f"data.fold=0 to {folds - 1}; a sweep runs them all: -m data.fold="
            + ",".join(str(index) for index in range(folds))
            + "."
        )


def fold_assignment(samples: list[Sample], folds: int, seed: int) -> dict[str, int]:
    """Path -> fold index (0 to `folds` - 1) for every sample, stratified by class and seeded;
    a byte-identical copy gets its original's fold. Raises `FinetuneError` when no class has
    `folds` images."""
    copies = originals(file_digests(path for path, _ in samples))
    singles = sorted(sample for sample in samples if sample[0] not in copies)
    labels = np.array([label for _, label in singles])
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():  # a class smaller than K: named by the report
            warnings.simplefilter("ignore", UserWarning)
            cut = list(splitter.split(np.zeros(len(labels)), labels))
    except ValueError as error:
        raise FinetuneError(
            f"data.folds={folds} folds cannot be made of {len(singles)} images: {error} Fix: "
            "fewer folds (data.folds=3 or 5)."
        ) from error
    fold_of = {singles[index][0]: fold for fold, (_, val) in enumerate(cut) for index in val}
    for copy, original in copies.items():
        fold_of[copy] = fold_of[original]
    return fold_of


def fold_split(splits: DatasetSplits, folds: int, fold: int, seed: int) -> DatasetSplits:
    """`splits` with train and val pooled and re-cut: fold `fold` of `folds` is val, the
    others train (in the pool's order); test as it was."""
    pool = splits.train + splits.val
    fold_of = fold_assignment(pool, folds, seed)
    return dataclasses.replace(
        splits,
        train=[sample for sample in pool if fold_of[sample[0]] != fold],
        val=[sample for sample in pool if fold_of[sample[0]] == fold],
        val_from=(
            f"fold {fold} of {folds} stratified folds of train and val pooled "
            f"(data.folds={folds}, data.split_seed={seed})"
        ),
    )
