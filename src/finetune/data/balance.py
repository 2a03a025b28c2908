"""Class imbalance: the training loss's weight per class (`data.class_weights`) and the balanced
training sampler (`data.sampler`), both read from the training split.

Weights follow scikit-learn's `class_weight` conventions and are computed by its
`compute_class_weight`: `balanced` gives class c the weight `n_samples / (n_classes * n_c)`
(n_c: its training images), so that every class adds the same total weight to the loss; a
mapping `{class name: weight}` weighs each named class so and every class it does not name 1.
Names the data does not have are refused, with the known classes, before training.

The balanced sampler draws `len(train)` training images with replacement, each with probability
proportional to 1 / n_c of its class (torch's `WeightedRandomSampler`): every class is drawn
equally often on average. Its expected loss is the loss weighted by the `balanced` weights,
which is what the solved linear probe, seeing every image once, minimises in its place
(`expected_class_weight`).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import WeightedRandomSampler

from finetune.config.messages import ConfigError
from finetune.config.values import BALANCED
from finetune.data.loading import sample_seed

log = logging.getLogger(__name__)


def check_class_names(option: Any, class_names: Sequence[str]) -> None:
    """`ConfigError` naming `data.class_weights` and the known classes when `option` is a
    mapping that names a class not in `class_names`, or gives a weight that is not a finite
    number above 0 (a zero weight would leave a batch of that class without a loss)."""
    if not isinstance(option, Mapping):
        return
    unknown = [str(name) for name in option if str(name) not in class_names]
    known = ", ".join(class_names)
    if unknown:
        guesses = [difflib.get_close_matches(name, class_names, n=1) for name in unknown]
        hint = "; ".join(f"{u} -> {g[0]}?" for u, g in zip(unknown, guesses, strict=True) if g)
        raise ConfigError(
            f"data.class_weights names {', '.join(unknown)}, not a class of this data "
            f"(classes: {known}){f'; did you mean {hint}' if hint else ''}. Fix: name classes "
            f"as their folders (or labels) are named, e.g. 'data.class_weights={{{class_names[0]}:"
            "2.0}' (quoted for the shell); a class not named weighs 1."
        )
    for name, weight in option.items():
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not number or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(
                f"data.class_weights gives class {name} the weight {weight!r}; a weight is a "
                f"number above 0. Fix: e.g. 'data.class_weights={{{name}:2.0}}'."
            )


def class_weights(
    option: Any, class_names: Sequence[str], train_labels: Sequence[int]
) -> list[float] | None:
    """The training loss's weight per class, in label order, for `data.class_weights=option`:
    None for `none`; scikit-learn's `balanced` weights of `train_labels`; a mapping's weights
    (`check_class_names` refuses a wrong one), 1 for a class it does not name. Logged once.
    `ConfigError` for `balanced` when a class has no training image (its weight would be
    infinite), naming it."""
    if option in (None, "none"):
        return None
    weights = _computed(option, class_names, train_labels)
    named = ", ".join(f"{name} {w:.3g}" for name, w in zip(class_names, weights, strict=True))
    log.info("data.class_weights=%s: the training loss weighs %s", option, named)
    return weights


def _computed(option: Any, class_names: Sequence[str], train_labels: Sequence[int]) -> list[float]:
    """`class_weights` of `balanced` or a mapping, by scikit-learn's `compute_class_weight`."""
    classes = np.arange(len(class_names))
    labels = np.asarray(train_labels, dtype=np.int64)
    if option == BALANCED:
        counts = np.bincount(labels, minlength=len(class_names))
        empty = [class_names[c] for c in classes if counts[c] == 0]
        if empty:
            raise ConfigError(
                f"data.class_weights=balanced weighs a class by 1 / its training images, and "
                f"{', '.join(empty)} has none in the training split. Fix: give it training "
                "images, or name the weights: data.class_weights={class: weight}."
            )
        return [float(w) for w in compute_class_weight(BALANCED, classes=classes, y=labels)]
    check_class_names(option, class_names)
    by_index = {class_names.index(str(name)): float(w) for name, w in option.items()}
    return [float(w) for w in compute_class_weight(by_index, classes=classes, y=labels)]


def expected_class_weight(
    class_weight: torch.Tensor | None,
    sampler: str,
    train_labels: torch.Tensor,
    class_names: Sequence[str],
) -> torch.Tensor | None:
    """The class weights whose loss over the whole training split (each image once, as the
    solved probe sees it) is the expected loss of training on the batches of `sampler` with
    `class_weight` ((classes,) or None): `class_weight` itself, times the balanced weights of
    `train_labels` when `sampler` is balanced (which draws class c with probability
    proportional to 1 / n_c, the balanced weight up to a constant)."""
    if sampler != BALANCED:
        return class_weight
    balanced = _computed(BALANCED, class_names, train_labels.tolist())
    sampled = torch.tensor(balanced, dtype=torch.float32, device=train_labels.device)
    log.info(
        "data.sampler=balanced: the solved linear probe sees every training image once, so it "
        "minimises the balanced sampler's expected loss instead: the loss weighted by the "
        "balanced class weights%s.",
        "" if class_weight is None else " times data.class_weights",
    )
    return sampled if class_weight is None else sampled * class_weight.to(sampled)


class BalancedSampler(WeightedRandomSampler):
    """Torch's `WeightedRandomSampler` over the training split with weight 1 / n_c for an image
    of class c, `len(labels)` draws with replacement; seeded per epoch by `(seed, epoch)` and
    yielding `(epoch, index)`, as `finetune.data.EpochSampler` does, so that a resumed run draws
    what an uninterrupted one draws and every process draws the same list (Lightning's
    `DistributedSamplerWrapper` then gives each process its own share of it)."""

    def __init__(self, labels: Sequence[int], seed: int, epoch: int = 0) -> None:
        classes = torch.as_tensor(list(labels), dtype=torch.long)
        weights = 1.0 / torch.bincount(classes)[classes].double()
        super().__init__(weights, num_samples=len(weights), replacement=True)
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        self.epoch += 1  # as EpochSampler: each pass counts as an epoch
        self.generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 1))
        return iter([(epoch, index) for index in super().__iter__()])
