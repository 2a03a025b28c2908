"""The strategy group's schemas: one dataclass per option of conf/strategy, with exactly that
strategy's keys (each strategy class in `finetune.strategies` is built from its own)."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any

from omegaconf import MISSING

from finetune.config.values import (
    AUTO_OR_COUNT,
    AUTO_TRUE_FALSE,
    BN_POLICIES,
    COUNT_FROM_ONE,
    HEAD_INITS,
    REFUSED_WHEN_ABSENT,
    RESUMABLE,
    one_of,
)


def named_option(class_name: str, base: type, name: str) -> type:
    """The schema of an option that takes its group's keys and defaults as they are (`base`)
    and only names itself: a dataclass `class_name(base)` with `name` defaulting to `name`,
    defined in `base`'s module (so that it pickles and prints as the others do)."""
    spec = ("name", str, field(default=name))
    namespace = {"__module__": base.__module__}
    return make_dataclass(class_name, [spec], bases=(base,), namespace=namespace)


# ---------------------------------------------------------------------------------------------
# strategy: one schema per option, with exactly that strategy's keys


@dataclass
class StrategyConfig:
    name: str = MISSING


@dataclass
class LastLayerConfig(StrategyConfig):
    name: str = "last_layer"
    # train the head on features cached once: auto = when the head is the solved probe (with
    # augmentation, on the clean images and augmented views) or the images are not augmented;
    # false = on images every epoch (the probe's head then trains on by the optimizer)
    cache_features: Any = field(default="auto", metadata=one_of(*AUTO_TRUE_FALSE))
    # probe: the head is solved first (L-BFGS, L2 chosen on val, finetune.probe); on cached
    # features that is the whole training.
    # random: the head starts from nn.Linear's initialisation and trains by the optimizer.
    # (resumable: a resume starts from its checkpoint's head, whatever the value)
    head_init: str = field(default="probe", metadata=one_of(*HEAD_INITS) | RESUMABLE)
    # With augmentation, the probe is solved on the clean training images and on this many
    # augmented views of each (finetune.features.augmented_views); auto: finetune.adaptive.
    # (before the key existed, last_layer with augmentation trained its head by SGD)
    augmented_views: Any = field(default="auto", metadata=AUTO_OR_COUNT | REFUSED_WHEN_ABSENT)


@dataclass
class BackboneTrainsConfig(StrategyConfig):
    # the pretrained layers learn at this fraction of the head's learning rate
    backbone_lr_scale: float = 0.1
    # BatchNorm in the trainable part: BN_POLICIES above
    bn: str = field(default="train_affine", metadata=one_of(*BN_POLICIES))


@dataclass
class TopKConfig(BackboneTrainsConfig):
    name: str = "top_k"
    # how many of the top blocks train besides the head
    k: int = field(default=2, metadata=one_of(types=(int,), minimum=0, example=2))


# Stems of the supported families: resnet, efficientnet/timm, mobilenet, vit, densenet.
STEM_PATTERNS = [
    "^conv_stem\\.",
    "^bn1\\.",
    "^conv1\\.",
    "^features\\.0\\.",
    "^conv_proj\\.",
    "^features\\.conv0\\.",
    "^features\\.norm0\\.",
]


@dataclass
class RegexConfig(BackboneTrainsConfig):
    name: str = "regex"
    # re.search over parameter names: a name trains if it matches `train` and not `freeze`
    train: list[str] = field(default_factory=lambda: [".*"])
    freeze: list[str] = field(default_factory=lambda: list(STEM_PATTERNS))


@dataclass
class GradualConfig(BackboneTrainsConfig):
    name: str = "gradual"
    # one more block joins every n epochs
    every_n_epochs: int = field(default=1, metadata=COUNT_FROM_ONE)
    on_plateau: bool = False  # instead: after `patience` epochs without a better val/acc
    patience: int = field(default=1, metadata=COUNT_FROM_ONE)


FullConfig = named_option("FullConfig", BackboneTrainsConfig, "full")


# LP-FT (Kumar et al. 2022): the head starts from the solved linear probe, then fine-tunes as
# `full` does (the same keys, defaults and rates: the comparison isolates the head's start).
LpFtConfig = named_option("LpFtConfig", BackboneTrainsConfig, "lp_ft")


@dataclass
class ScratchConfig(StrategyConfig):
    name: str = "scratch"
    # randomly initialised BatchNorm must learn its statistics
    bn: str = field(default="train", metadata=one_of(*BN_POLICIES))
