"""The allowed values, ranges and defaults of config keys that code outside the schema reads.

A key with a fixed set of values lists them in its field's metadata (`one_of`); code that acts
on a value imports its tuple from here. A key of mixed type (OmegaConf 2.3 has no Union) is `Any`
with its values and/or types there. `finetune.config.validate` checks them all before anything
runs, and `finetune.config.check_fields` checks a config built in code the same way. No torch
here: checking a command line must not import it.
"""

from __future__ import annotations

from typing import Any

# A key the data-adaptive rules (finetune.adaptive) fill in when left at this value.
AUTO = "auto"

# What BatchNorm layers inside the trainable part do (frozen parts are always in eval mode):
#   train:        batch statistics in training, running statistics and affine parameters update;
#   train_affine: eval mode (running statistics fixed), affine parameters train;
#   frozen:       eval mode and affine parameters frozen too.
BN_POLICIES = ("train", "train_affine", "frozen")
AUTO_TRUE_FALSE = (AUTO, True, False)
AUTO_AUGMENT_POLICIES = ("none", "trivialaugment", "randaugment")
DEVICE_TRANSFORMS = (AUTO, "normalise", True, False)
SCHEDULERS = ("cosine", "step", "constant")
# Where a new head starts: probe = the linear probe solved on cached features (finetune.probe),
# random = nn.Linear's initialisation.
HEAD_INITS = ("probe", "random")
# How a run trains (finetune.strategies.training_regime), which the data-adaptive defaults read.
REGIMES = ("probe", "head", "finetune", "from_probe")
# The validation metric that picks the best checkpoint, early stopping's epoch and the linear
# probe's L2 strength (`selection.metric`): top-1 accuracy, balanced accuracy (the mean recall
# of the classes) or macro-F1 (the mean F1 of the classes), all logged by the module.
SELECTION_METRICS = ("val/acc", "val/balanced_acc", "val/macro_f1")
# finetune.sources.SOURCES and finetune.data.layouts.LAYOUTS hold a builder per name (they need
# torch, which checking a command line must not import); tests keep their names equal to these.
MODEL_SOURCES = ("torchvision", "timm", "efficientnet_lite")
DATASETS = ("hymenoptera", "flowers102", "imagefolder", "csv", "synthetic")
# Lightning's accepted `precision` values (lightning_fabric.connector._PRECISION_INPUT; a test
# keeps them equal).
PRECISIONS = (
    None,
    64,
    32,
    16,
    "64",
    "32",
    "16",
    "bf16",
    "transformer-engine",
    "transformer-engine-float16",
    "16-true",
    "16-mixed",
    "bf16-true",
    "bf16-mixed",
    "32-true",
    "64-true",
)


def one_of(
    *values: Any,
    types: tuple[type, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    example: Any = None,
) -> dict[str, Any]:
    """Field metadata: the value must be one of `values` (compared with its type: `True` is not
    `1`) or an instance of one of `types` (a `bool` is not an `int` here), and an instance of
    `types` must be >= `minimum`, <= `maximum`, > `above` and < `below` when given. `list`
    means a list. `example`: the value a message suggests (else the first bound given)."""
    bounds = {"minimum": minimum, "maximum": maximum, "above": above, "below": below}
    return {"choices": values, "types": types, "example": example} | bounds


# A count of at least one (epochs, images).
COUNT_FROM_ONE = one_of(types=(int,), minimum=1)
# A probability or a share of a split.
PROBABILITY = one_of(types=(float, int), minimum=0, maximum=1)
FRACTION = one_of(types=(float, int), above=0, maximum=1, example=1.0)
# RandomResizedCrop's scale range: [lo, hi] with 0 < lo <= hi <= 1 (an area share).
CROP_SCALE = {"choices": (), "types": (list,), "scale_range": True}
# Class imbalance (finetune.data.balance): data.class_weights is one of these or a mapping
# {class name: weight}; data.sampler draws each class equally often when balanced.
BALANCED = "balanced"
CLASS_WEIGHTS = one_of("none", BALANCED, types=(dict,), example=BALANCED)
SAMPLERS = one_of("none", BALANCED)


# Keys that a rule of finetune.adaptive fills in from the data when left at `auto`.
AUTO_OR_COUNT = one_of(AUTO, types=(int,), minimum=0)
AUTO_OR_POSITIVE_INT = one_of(AUTO, types=(int,), minimum=1)
AUTO_OR_NUMBER = one_of(AUTO, types=(float, int))


# Below this share of loaded layers, pretrained weights did not fit the network (a wrong file, a
# naming nobody maps): a run would train from random weights it did not ask for. Every loader
# with a head that does not fit still loads all but one layer, far above it.
MIN_LOADED_FRACTION = 0.5

# The project's cache folder: $FINETUNE_CACHE_DIR, else finetune-lab in the user's cache folder.
PROJECT_CACHE_DIR = "${oc.env:FINETUNE_CACHE_DIR,${oc.env:XDG_CACHE_HOME,'~/.cache'}/finetune-lab}"

# What a resume (finetune.resume_config) reads of a key, merged into its field's metadata:
# RESUMABLE: a resume may change it (how and how long the run trains, not what it learns).
# REFUSED_WHEN_ABSENT: a run saved before the key existed trained otherwise than its default
# trains now, so such a run cannot resume; any other key missing from a run's saved config
# takes its default.
RESUMABLE = {"resumable": True}
REFUSED_WHEN_ABSENT = {"refused_when_absent": True}
# The free-form groups (no dataclass) whose entries a resume may change, the key itself too.
# The monitors follow `selection.metric`, which a resume may change: the epochs from then on are
# ranked by the new metric.
RESUMABLE_ENTRIES = (
    "callbacks.progress_bar",
    "logger",
    "callbacks.model_checkpoint.monitor",
    "callbacks.early_stopping.monitor",
)
