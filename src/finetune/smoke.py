"""The smoke test of `debug=fast` (`smoke_test=true`): each split cut to the images its few
batches reach.

A smoke test runs two batches of each split (`trainer.limit_<split>_batches`), but the run
around them would still read the whole dataset first: the features of every training and
validation image for the linear probe (and of their augmented views), the decode cache. With
`smoke_test=true`, each split whose `trainer.limit_<split>_batches` is a count is cut, before
anything reads it, to the images those batches reach (count x batch size x processes), the
classes taken in turn so that a small cut holds every class it can; the linear probe is then
solved on that subset, and `strategy.augmented_views=auto` is 0 (`finetune.adaptive`).

The feature cache is keyed by the exact files of each split (`finetune.features`), so the
features of a cut split are stored apart from the whole split's: a real run never reads them
(only where the split was no larger than the cut are they the same features, and shared).
metrics.json keeps the whole splits' `split_sizes` (so the evaluation still reads as partial)
and adds `smoke_test_images`, the images each split was cut to.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from omegaconf import DictConfig
from pytorch_lightning.utilities.rank_zero import rank_zero_only  # rank set by Lightning

from finetune.data import FinetuneDataModule, Sample

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def reached(cfg: DictConfig, processes: int = 1) -> dict[str, int]:
    """Split -> how many images the smoke test's batches of it reach: for each split whose
    `trainer.limit_<split>_batches` is a positive count, that count x its batch size
    (`data.batch_size` for train, `data.eval_batch_size` else; `cfg` with the resolved batch)
    x `processes`; {} without `smoke_test` (a fraction or no limit leaves its split whole)."""
    if not cfg.get("smoke_test"):
        return {}
    train_batch = int(cfg.data.batch_size)
    batches = {"train": train_batch, "val": int(cfg.data.get("eval_batch_size") or train_batch)}
    batches["test"] = batches["val"]
    counts = {}
    for split in SPLITS:
        limit = cfg.trainer.get(f"limit_{split}_batches")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            counts[split] = limit * batches[split] * processes
    return counts


def in_turns(samples: list[Sample], count: int) -> list[Sample]:
    """`count` of `samples` taken class by class in turn (each class's in its listed order),
    kept in the listed order; all of them when there are no more."""
    if count >= len(samples):
        return samples
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(index)
    turns = itertools.zip_longest(*by_class.values())
    chosen = [index for turn in turns for index in turn if index is not None][:count]
    return [samples[index] for index in sorted(chosen)]


def cut_splits(
    cfg: DictConfig, datamodule: FinetuneDataModule, processes: int = 1, probe: bool = False
) -> dict[str, Any]:
    """Cut the prepared `datamodule`'s splits to what the smoke test of `cfg` reaches
    (`reached`), and say so once (that the linear probe is solved on the cut, when `probe`: the
    run solves one). Call it before the splits are read (features, datasets, the evaluation
    report) and after the run's split.json was written and checked (it records the whole
    splits). Returns the part of metrics.json: the whole `split_sizes` and
    `smoke_test_images`; {} without a smoke test."""
    counts = reached(cfg, processes)
    if not counts:
        return {}
    splits = datamodule.splits
    whole = splits.sizes()
    for split, count in counts.items():
        samples = getattr(splits, split)
        if samples is not None:
            setattr(splits, split, in_turns(samples, count))
    cut = splits.sizes()
    _say(whole, cut, probe)
    return {"split_sizes": whole, "smoke_test_images": cut}


@rank_zero_only
def _say(whole: dict[str, int], cut: dict[str, int], probe: bool) -> None:
    sizes = ", ".join(f"{split} {cut[split]} of {whole[split]}" for split in cut)
    solved = ""
    if probe and "train" in cut:
        solved = (
            f" The linear probe is solved on this subset ({cut['train']} of the {whole['train']} "
            "training images), for the smoke test only: its features are extracted for these "
            "images alone, and its numbers are not the split's."
        )
    log.info(
        "Smoke test (smoke_test=true, as debug=fast sets it): each split is cut to the images "
        "its limited batches reach (%s).%s",
        sizes,
        solved,
    )
