"""Data-adaptive defaults: the rules that choose the values of config keys left at `auto`.

A key left at `auto` gets its value from the data once the splits are known (after
`prepare_data`): the number of training images and classes, and the training regime. Every
value a user sets (command line, experiment file, sweep) is kept as set. The rules, their
constants and their sources are all here; `resolve` applies them and logs what it chose, one
line per key, and `metrics_entry` is what metrics.json records of it.

| key | rule |
|---|---|
| `data.batch_size` | per process: 32, halved while an epoch gives fewer than 4 optimizer steps, >= 8 |
| `trainer.max_epochs` | probe: 1; else ceil(P / images per class) within [lo, hi] |
| `optim.optimizer.lr` | base(optimizer, regime) x images per optimizer step / 32 |
| `strategy.augmented_views` | probe, augmented: ceil(100 / images per class) in [5, 15], clean + views <= 50k rows; else 0 (also for `smoke_test`) |

Regimes (`finetune.config.schema.REGIMES`; `finetune.strategies.plan` says which one a run
is):
- `probe`: last_layer on cached features; the head is solved before fit (with augmentation, on
  the clean images and their augmented views), the epoch evaluates.
- `head`: last_layer with `strategy.head_init=random` or `strategy.cache_features=false`; the
  head trains by the optimizer.
- `finetune`: full, top_k, regex, gradual, scratch.
- `from_probe`: lp_ft; every layer trains, the head starts from the probe's solution.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.rank_zero import rank_zero_only  # rank set by Lightning

from finetune.config import check_fields
from finetune.config.schema import LastLayerConfig
from finetune.config.values import AUTO, REGIMES
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

# The keys whose `auto` the rules below resolve.
RULED_KEYS = (
    "data.batch_size",
    "trainer.max_epochs",
    "optim.optimizer.lr",
    "strategy.augmented_views",
)

# data.batch_size: enough optimizer steps per epoch for small data, batches large enough for
# BatchNorm statistics and a stable gradient.
BATCH_SIZE = 32
MIN_BATCHES_PER_EPOCH = 4
MIN_BATCH_SIZE = 8

# trainer.max_epochs: how many times every class's images are presented (P), and the epochs
# allowed, per regime. The probe's head is solved before fit: its one epoch only evaluates.
PROBE_EPOCHS = 1
PRESENTATIONS = {"head": 100, "finetune": 200, "from_probe": 200}
EPOCH_RANGE = {"head": (5, 15), "finetune": (10, 30), "from_probe": (10, 30)}

# strategy.augmented_views: with augmentation, the probe sees every class's images about this
# many times (clean + views), as the head regime's epochs would; within the same bounds.
VIEW_PRESENTATIONS = PRESENTATIONS["head"]
VIEW_RANGE = EPOCH_RANGE["head"]
# The probe is solved full-batch: the clean images and their views together stay within this
# many rows (50k x 1280-d float32 features = 256 MB): large datasets get fewer views, or none.
MAX_PROBE_ROWS = 50_000

# optim.optimizer.lr: the rate at REFERENCE_BATCH_SIZE, per regime, for SGD; AdamW takes a
# tenth of it. from_probe fine-tunes at finetune's rates: of the rates measured on Flowers102
# (docs/strategies.md, "LP-FT on Flowers102"), 0.003 for every layer lost 21 points of the probe
# in the first epochs, full's rates 6, for the same end.
REFERENCE_BATCH_SIZE = 32
SGD_BASE_LR = {"probe": 0.01, "head": 0.01, "finetune": 0.01}
SGD_BASE_LR["from_probe"] = SGD_BASE_LR["finetune"]
ADAMW_LR_FACTOR = 0.1
BASE_LR_FACTOR = {"torch.optim.SGD": 1.0, "torch.optim.AdamW": ADAMW_LR_FACTOR}


class Choice(NamedTuple):
    value: Any
    rule: str  # one readable line: how the value came about


def auto_batch_size(train_images: int, batches_per_step: int = 1) -> Choice:
    """The training batch size per process for `train_images` images (the training split,
    after `data.train_fraction`) when `batches_per_step` such batches make one optimizer step
    (processes x trainer.accumulate_grad_batches): BATCH_SIZE, halved while the split would
    give fewer than MIN_BATCHES_PER_EPOCH optimizer steps, never below MIN_BATCH_SIZE.

    Source: the common ImageNet fine-tuning batch of 32 (torchvision's references, BiT's
    per-device batch); the halving keeps several optimizer steps per epoch on small data."""
    size = BATCH_SIZE
    while size > MIN_BATCH_SIZE and train_images < MIN_BATCHES_PER_EPOCH * size * batches_per_step:
        size //= 2
    size = max(size, MIN_BATCH_SIZE)
    return Choice(
        size,
        f"{BATCH_SIZE}, halved while {train_images} training images give fewer than "
        f"{MIN_BATCHES_PER_EPOCH} optimizer steps{_per_step(batches_per_step)}, at least "
        f"{MIN_BATCH_SIZE}",
    )


def _per_step(batches_per_step: int) -> str:
    if batches_per_step == 1:
        return ""
    return f" of {batches_per_step} batches (processes x gradient accumulation)"


def auto_max_epochs(regime: str, train_images: int, num_classes: int) -> Choice:
    """The number of epochs: PROBE_EPOCHS for `probe` (the solve is the training); otherwise
    ceil(P / ipc) with ipc = train_images / num_classes images per class, clamped to the
    regime's EPOCH_RANGE, so that every class's images are presented about P times.

    Source: the BiT-HyperRule (Kolesnikov et al. 2020, "Big Transfer (BiT): General Visual
    Representation Learning") sets the schedule length from the dataset size alone. It counts
    optimizer steps for a 512-image batch on accelerators (500 steps below 20k images); this
    rule counts presentations per class instead, so that many classes with few images each
    still train long enough, within a CPU budget (hi)."""
    _check_regime(regime)
    if regime == "probe":
        return Choice(PROBE_EPOCHS, "the head is solved before fit; one epoch evaluates it")
    presentations, (low, high) = PRESENTATIONS[regime], EPOCH_RANGE[regime]
    per_class = max(train_images, 1) / max(num_classes, 1)
    wanted = math.ceil(presentations / per_class)
    return Choice(
        min(max(wanted, low), high),
        f"each class's images about {presentations} times: ceil({presentations} / "
        f"{per_class:.1f} images per class) = {wanted}{_range(wanted, low, high)} ({regime})",
    )


def _range(wanted: int, low: int, high: int) -> str:
    """How a rule's count sits in its allowed range, for the printed rule."""
    if low <= wanted <= high:
        return f", within [{low}, {high}]"
    return f", clamped to [{low}, {high}]"


def auto_views(
    regime: str, augmenting: bool, train_images: int, num_classes: int, smoke_test: bool = False
) -> Choice:
    """The number of augmented views of each training image the linear probe is solved on
    (besides the clean image): with augmentation in the `probe` regime, ceil(P / ipc) within
    VIEW_RANGE, P = VIEW_PRESENTATIONS and ipc = images per class, as `auto_max_epochs` counts
    the `head` regime's epochs (a view costs what an epoch of the head on images costs: one
    forward pass over the training images), lowered so that the full-batch solve has at most
    MAX_PROBE_ROWS rows (clean + views; no views above MAX_PROBE_ROWS / 2 images); otherwise 0,
    and 0 for a `smoke_test` (`finetune.smoke`: views of every image would cost epochs).

    Source: the views are the head regime's augmented epochs, solved at once instead of
    followed by SGD (the same objective: cross-entropy + L2 over augmented images). Measured
    on Flowers102 (ten images per class): val accuracy 0.8735 clean, 0.8824 with five views
    (docs/accuracy.md)."""
    _check_regime(regime)
    if regime != "probe":
        return Choice(0, f"regime {regime}: the head trains by the optimizer, no probe to widen")
    if not augmenting:
        return Choice(0, "no augmentation: the probe is solved on the clean images only")
    if smoke_test:
        return Choice(0, "smoke test (debug=fast): the probe is solved on the clean images only")
    per_class = max(train_images, 1) / max(num_classes, 1)
    wanted = math.ceil(VIEW_PRESENTATIONS / per_class)
    low, high = VIEW_RANGE
    rule = (
        f"each class's images about {VIEW_PRESENTATIONS} times: ceil({VIEW_PRESENTATIONS} / "
        f"{per_class:.1f} images per class) = {wanted}{_range(wanted, low, high)}"
    )
    views = min(max(wanted, low), high)
    fitting = max(MAX_PROBE_ROWS // max(train_images, 1) - 1, 0)
    if fitting < views:
        rule += f"; at most {fitting} so that clean + views fit {MAX_PROBE_ROWS} rows"
    return Choice(min(views, fitting), rule)


def auto_lr(optimizer: str, regime: str, batch_size: int, batches_per_step: int = 1) -> Choice:
    """The learning rate of `optimizer` (its `_target_`): the regime's SGD_BASE_LR (x
    ADAMW_LR_FACTOR for AdamW) x the images of one optimizer step (batch_size per process x
    `batches_per_step`: processes x trainer.accumulate_grad_batches) / REFERENCE_BATCH_SIZE.

    Source: the linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD:
    Training ImageNet in 1 Hour"), which scales with the batch of one optimizer step. Raises
    `FinetuneError` for an optimizer without a base rate."""
    _check_regime(regime)
    if optimizer not in BASE_LR_FACTOR:
        raise FinetuneError(
            f"optim.optimizer.lr=auto has no rule for the optimizer {optimizer} (only for "
            f"{', '.join(BASE_LR_FACTOR)}). Fix: set optim.optimizer.lr=... on the command line."
        )
    base = SGD_BASE_LR[regime] * BASE_LR_FACTOR[optimizer]
    value = float(f"{base * batch_size * batches_per_step / REFERENCE_BATCH_SIZE:.6g}")
    name = optimizer.rpartition(".")[2]
    batch = str(batch_size)
    if batches_per_step > 1:
        batch = f"{batch_size} x {batches_per_step} (processes x gradient accumulation)"
    rule = (
        f"{name} base {base:g} ({regime}) x batch {batch} / {REFERENCE_BATCH_SIZE}, "
        "linear scaling (Goyal et al. 2017)"
    )
    if regime == "probe":  # the optimizer exists (clipping, AMP, logging work as in any run)
        rule += "; unused: the probe is solved by L-BFGS and its epoch steps at learning rate 0"
    return Choice(value, rule)


def resolve(
    cfg: DictConfig,
    train_images: int,
    num_classes: int,
    regime: str,
    augmenting: bool = False,
    batches_per_step: int = 1,
) -> tuple[DictConfig, dict[str, Any]]:
    """A copy of `cfg` with every `auto` of data.batch_size, trainer.max_epochs,
    optim.optimizer.lr and strategy.augmented_views replaced by its rule's value, for
    `train_images` training images (the training split as the data module lists it) of
    `num_classes` classes in `regime` (one of REGIMES), with training images augmented or not
    (`augmenting`), where `batches_per_step` batches of data.batch_size (one per process, times
    trainer.accumulate_grad_batches) make one optimizer step. Returns it and key -> {"value": v,
    "rule": "one readable line"} for each value chosen (empty when the user set them all).
    Logs one block at INFO (rank 0), one line per key: key = value (rule). Raises `FinetuneError` for an unknown regime or an optimizer
    without a base rate."""
    _check_regime(regime)
    resolved = copy.deepcopy(cfg)
    chosen: dict[str, Any] = {}

    def choose(key: str, rule: Choice) -> Any:
        with open_dict(resolved):
            OmegaConf.update(resolved, key, rule.value, merge=False)
        chosen[key] = {"value": rule.value, "rule": rule.rule}
        return rule.value

    batch_size = resolved.data.batch_size
    if batch_size == AUTO:
        batch_size = choose("data.batch_size", auto_batch_size(train_images, batches_per_step))
    if resolved.trainer.get("max_epochs") == AUTO:
        max_steps = resolved.trainer.get("max_steps", -1)
        if max_steps is not None and max_steps > 0:  # the user's length, in steps
            choose("trainer.max_epochs", Choice(None, f"trainer.max_steps={max_steps} sets it"))
        else:
            choose("trainer.max_epochs", auto_max_epochs(regime, train_images, num_classes))
    if resolved.optim.optimizer.get("lr") == AUTO:
        target = str(resolved.optim.optimizer.get("_target_"))
        choose("optim.optimizer.lr", auto_lr(target, regime, int(batch_size), batches_per_step))
    views = resolved.strategy.get("augmented_views")
    if views == AUTO:
        smoke_test = bool(resolved.get("smoke_test"))
        choose(
            "strategy.augmented_views",
            auto_views(regime, augmenting, train_images, num_classes, smoke_test),
        )
    elif views is not None:
        _check_views(int(views), regime, augmenting)
    given = {key: OmegaConf.select(cfg, key) for key in RULED_KEYS if key not in chosen}
    given = {key: value for key, value in given.items() if value is not None}
    _log_block(chosen, given, train_images, num_classes, regime)
    epochs = resolved.trainer.get("max_epochs")
    if regime == "probe" and epochs != PROBE_EPOCHS:
        log.warning(
            "trainer.max_epochs=%s with the solved linear probe: the head is solved before fit "
            "and its epochs change nothing (learning rate 0), so every epoch after the first "
            "repeats the same numbers. Fix: drop trainer.max_epochs (auto: 1), or train the "
            "head by the optimizer with strategy.head_init=random.",
            epochs,
        )
    return resolved, chosen


def metrics_entry(chosen: dict[str, Any]) -> dict[str, Any]:
    """The part of metrics.json that records `resolve`'s choices: {"adaptive": {key: value}}."""
    return {"adaptive": {key: choice["value"] for key, choice in chosen.items()}}


@rank_zero_only
def _log_block(
    chosen: dict[str, Any], given: dict[str, Any], train_images: int, num_classes: int, regime: str
) -> None:
    """The rules' choices, and the keys of the rules the user set (kept as given)."""
    if not chosen:
        return
    lines = [f"  {key} = {choice['value']} ({choice['rule']})" for key, choice in chosen.items()]
    lines += [f"  {key} = {value} (set, kept as given)" for key, value in given.items()]
    log.info(
        "Data-adaptive defaults for %d training images of %d classes (regime %s; "
        "docs/configuration.md, override any on the command line):\n%s",
        train_images,
        num_classes,
        regime,
        "\n".join(lines),
    )


def _check_views(views: int, regime: str, augmenting: bool) -> None:
    """`FinetuneError` for a set strategy.augmented_views that cannot apply (`ConfigError` for
    one outside the schema's range)."""
    check_fields({"augmented_views": views}, LastLayerConfig, "strategy")
    if views > 0 and regime != "probe":
        raise FinetuneError(
            f"strategy.augmented_views={views} applies to the solved linear probe, but this "
            f"run's head trains by the optimizer (regime {regime}: strategy.head_init=random "
            "or strategy.cache_features=false). Fix: drop strategy.augmented_views, or use "
            "strategy.head_init=probe with strategy.cache_features=auto."
        )
    if views > 0 and not augmenting:
        raise FinetuneError(
            f"strategy.augmented_views={views} without augmentation: every view would be the "
            "clean image again. Fix: drop strategy.augmented_views, or choose an augmentation "
            "(augment=default)."
        )
    if views == 0 and augmenting and regime == "probe":
        log.warning(
            "strategy.augmented_views=0: the probe is solved on the clean images only, so "
            "data.augment has no effect. Fix: drop strategy.augmented_views (auto) to solve it "
            "on augmented views too."
        )


def _check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise FinetuneError(f"Unknown training regime '{regime}'. Valid: {', '.join(REGIMES)}.")
