"""Train and eval presets, built from a backbone's `InputSpec` and the augmentation options.

Kept separate and explicit as in torchvision's references: evaluation is always
resize -> center crop -> normalise with the weights' own numbers; training adds the augmentation
chosen in `conf/augment/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from finetune.backbones import InputSpec
from finetune.errors import unknown_name

AUTO_AUGMENT_POLICIES = ("none", "trivialaugment", "randaugment")


def _normalise(spec: InputSpec) -> list[v2.Transform]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
    ]


def eval_transform(spec: InputSpec) -> v2.Compose:
    interpolation = InterpolationMode(spec.interpolation)
    return v2.Compose(
        [
            v2.Resize(spec.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(spec.crop_size),
            v2.ToImage(),
            *_normalise(spec),
        ]
    )


def train_transform(spec: InputSpec, augment: Mapping[str, Any]) -> v2.Compose:
    """The training preset; with every option off it equals `eval_transform`."""
    interpolation = InterpolationMode(spec.interpolation)
    steps: list[v2.Transform] = []
    if augment.get("random_resized_crop", True):
        scale = tuple(augment.get("crop_scale", (0.08, 1.0)))
        steps.append(
            v2.RandomResizedCrop(
                spec.crop_size, scale=scale, interpolation=interpolation, antialias=True
            )
        )
    else:
        steps += [
            v2.Resize(spec.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(spec.crop_size),
        ]
    if augment.get("hflip", True):
        steps.append(v2.RandomHorizontalFlip())
    jitter = float(augment.get("color_jitter", 0.0) or 0.0)
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    policy = str(augment.get("auto_augment", "none") or "none").lower()
    if policy not in AUTO_AUGMENT_POLICIES:
        raise unknown_name("augment.auto_augment policy", policy, AUTO_AUGMENT_POLICIES)
    if policy == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif policy == "randaugment":
        steps.append(v2.RandAugment(interpolation=interpolation))
    # Everything above runs on PIL images, which (unlike tensors) support bicubic rotations.
    steps += [v2.ToImage(), *_normalise(spec)]
    erasing = float(augment.get("random_erasing", 0.0) or 0.0)
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing))
    return v2.Compose(steps)
