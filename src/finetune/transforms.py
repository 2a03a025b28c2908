"""Train and eval presets, built from a backbone's `InputSpec` and the augmentation options.

Kept separate and explicit as in torchvision's references: evaluation is always
resize -> center crop -> normalise with the weights' own numbers; training adds the augmentation
chosen in `conf/augment/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def is_augmenting(augment: Mapping[str, Any]) -> bool:
    """Whether these options make training images differ from the eval preprocessing."""
    return bool(
        augment.get("random_resized_crop", True)
        or augment.get("hflip", True)
        or float(augment.get("color_jitter", 0.0) or 0.0) > 0
        or str(augment.get("auto_augment", "none") or "none").lower() != "none"
        or float(augment.get("random_erasing", 0.0) or 0.0) > 0
    )


def eval_transform(spec: InputSpec, normalise: bool = True) -> v2.Compose:
    """Resize, center crop and normalise with the weights' own numbers. `normalise=False` stops
    at uint8 (the device finishes the job, see `device_normalise`)."""
    interpolation = InterpolationMode(spec.interpolation)
    return v2.Compose(
        [
            v2.Resize(spec.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(spec.crop_size),
            v2.ToImage(),
            *(_normalise(spec) if normalise else []),
        ]
    )


def train_transform(
    spec: InputSpec,
    augment: Mapping[str, Any],
    normalise: bool = True,
    tensor_input: bool = False,
) -> v2.Compose:
    """The training preset; with every option off it equals `eval_transform`.

    `normalise=False` stops at uint8 and leaves normalisation and random erasing to
    `device_normalise`. `tensor_input=True` (decoded-image cache) makes the auto-augment
    policies rotate bilinearly, the best tensors support.
    """
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
    # PIL images support bicubic rotations; tensors only nearest and bilinear.
    rotation = InterpolationMode.BILINEAR if tensor_input else interpolation
    if policy == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=rotation))
    elif policy == "randaugment":
        steps.append(v2.RandAugment(interpolation=rotation))
    steps.append(v2.ToImage())
    if normalise:
        steps += _normalise(spec)
        erasing = float(augment.get("random_erasing", 0.0) or 0.0)
        if erasing > 0:
            steps.append(v2.RandomErasing(p=erasing))
    return v2.Compose(steps)


def device_normalise(
    spec: InputSpec, augment: Mapping[str, Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The end of the preset for a uint8 batch already on the training device: to float,
    normalise, then random erasing per image (training only; pass `augment={}` for eval)."""
    normalise = v2.Compose(_normalise(spec))
    erasing = float(augment.get("random_erasing", 0.0) or 0.0)
    erase = v2.RandomErasing(p=erasing) if erasing > 0 else None

    def finish(images: torch.Tensor) -> torch.Tensor:
        images = normalise(images.as_subclass(torch.Tensor))
        if erase is not None:
            images = torch.stack([erase(image) for image in images])
        return images

    return finish
