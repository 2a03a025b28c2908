"""Train and eval presets, built from a backbone's `InputSpec` and the augmentation options.

Kept separate and explicit as in torchvision's references: evaluation is resize -> centre crop
-> normalise with the weights' own numbers, resized as the weights' crop mode says (timm's
`center`, `squash` or `border`, see `InputSpec`) so that it equals the library's own eval
transform; training adds the augmentation chosen in `conf/augment/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from finetune.config.schema import AUTO_AUGMENT_POLICIES
from finetune.errors import unknown_name
from finetune.input_spec import InputSpec


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


def train_decode_size(spec: InputSpec) -> int:
    """Shorter side (pixels) of decoded training images: random crops keep ImageNet's 256/224
    margin of resolution above the crop size."""
    return max(spec.resize_size, round(spec.crop_size * 256 / 224))


def eval_resize(spec: InputSpec) -> Callable:
    """The first step of evaluation: a PIL image or uint8 tensor resized to `spec.resize_size`
    as `spec.crop_mode` says (timm's rules: `center` the shorter side, `squash` both sides,
    `border` the longer side). Applied twice it resizes once: the decode cache stores its
    output and the eval transform finds nothing left to resize."""
    interpolation = InterpolationMode(spec.interpolation)
    size = spec.resize_size
    if spec.crop_mode == "squash":
        return v2.Resize((size, size), interpolation=interpolation, antialias=True)
    if spec.crop_mode == "border":
        from timm.data.transforms import ResizeKeepRatio

        return ResizeKeepRatio((size, size), interpolation=spec.interpolation, longest=1.0)
    return v2.Resize(size, interpolation=interpolation, antialias=True)


class CenterCropOrPad:
    """timm's `CenterCropOrPad` (its `border` crop mode) for PIL images and uint8 tensors alike
    (timm's own refuses a colour fill on tensors): a side shorter than `size` is padded with
    `fill` (one value per channel) as timm splits it, then the centre `size` square is taken."""

    def __init__(self, size: int, fill: list[int]) -> None:
        self.size, self.fill = size, fill

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        height, width = F.get_size(image)
        pad_w, pad_h = max(self.size - width, 0), max(self.size - height, 0)
        if pad_w or pad_h:
            padding = [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2]
            image = F.pad(image, padding, fill=self.fill)
        return F.center_crop(image, [self.size, self.size])

    def __repr__(self) -> str:
        return f"CenterCropOrPad(size={self.size}, fill={self.fill})"


def eval_crop(spec: InputSpec) -> Callable:
    """The centre `crop_size` square; `border` mode pads a smaller image with the mean colour."""
    if spec.crop_mode == "border":
        return CenterCropOrPad(spec.crop_size, fill=[round(255 * v) for v in spec.mean])
    return v2.CenterCrop(spec.crop_size)


def eval_transform(spec: InputSpec, normalise: bool = True) -> v2.Compose:
    """Resize (`eval_resize`), centre crop (`eval_crop`) and normalise with the weights' own
    numbers: a PIL image or uint8 tensor -> float32 `(3, crop, crop)`, the same tensor as the
    weights' library gives (torchvision's `weights.transforms()`, timm's `create_transform`).
    `normalise=False` stops at uint8 (the device finishes the job, see `device_normalise`)."""
    return v2.Compose(
        [eval_resize(spec), eval_crop(spec), v2.ToImage(), *(_normalise(spec) if normalise else [])]
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
        steps += [eval_resize(spec), eval_crop(spec)]
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


# ------------------------------------------------------------------------------------------
# Cropping on the device: the loader ships the part of each uint8 image its crop box needs, with
# the box and a flip flag; the training device cuts, resizes and flips the batch at once.
# ------------------------------------------------------------------------------------------

CropSample = tuple[torch.Tensor, torch.Tensor, bool]  # uint8 image, box (x0, y0, x1, y1), flip


def crops_on_device(augment: Mapping[str, Any]) -> bool:
    """Whether the training preset can run on the device: a random resized crop and flip, the
    default. Colour jitter and auto-augment change each image differently after the crop, so
    with them the loader workers keep the whole preset."""
    return bool(
        augment.get("random_resized_crop", True)
        and float(augment.get("color_jitter", 0.0) or 0.0) == 0
        and str(augment.get("auto_augment", "none") or "none").lower() == "none"
    )


class CropBox:
    """The loader's half of a device crop: draws an image's random-resized-crop box and its
    flip from the global generator (the dataset seeds it per image and epoch) and returns the
    part of the image the crop needs with them. Images that are not in the decode cache are
    first resized so that their shorter side is `short_side`, as the cache would have stored
    them.

    Only the box and a 1-pixel margin around it travel (the box is moved into that piece): every
    bilinear sample of `device_crop` lies within half a pixel of the box, so it reads nothing
    further, and the batch canvas grows with the crops, at most `4/3 * short_side + 4` pixels a
    side (crop boxes keep an aspect ratio within 3:4..4:3), never with the most elongated
    image (two 1:16 images would pad a whole batch to 4097x4097)."""

    def __init__(self, spec: InputSpec, augment: Mapping[str, Any], short_side: int) -> None:
        self.scale = tuple(augment.get("crop_scale", (0.08, 1.0)))
        self.hflip = bool(augment.get("hflip", True))
        self.short_side = short_side
        self.interpolation = InterpolationMode(spec.interpolation)

    def __call__(self, image: Image.Image | torch.Tensor) -> CropSample:
        if isinstance(image, Image.Image):
            image = F.resize(image, self.short_side, self.interpolation, antialias=True)
            image = F.pil_to_tensor(image)
        image = image.as_subclass(torch.Tensor)
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, [3 / 4, 4 / 3])
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        y0, x0 = max(top - 1, 0), max(left - 1, 0)
        y1 = min(top + height + 1, image.shape[1])
        x1 = min(left + width + 1, image.shape[2])
        box = [left - x0, top - y0, left - x0 + width, top - y0 + height]
        return image[:, y0:y1, x0:x1], torch.tensor(box, dtype=torch.float32), flip

    def __repr__(self) -> str:
        return f"CropBox(scale={self.scale}, hflip={self.hflip}, short_side={self.short_side})"


def collate_crop_samples(
    samples: list[tuple[CropSample, int]],
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Stack images of different sizes into one zero-padded uint8 canvas, with their boxes and
    flips. One row and one column past each image repeat its edge: resizing samples up to half
    a pixel beyond a box, and there it must find the image's edge, not the padding."""
    images = [image for (image, _, _), _ in samples]
    height = max(image.shape[1] for image in images) + 1
    width = max(image.shape[2] for image in images) + 1
    canvas = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    if get_worker_info() is not None:  # in a loader worker: fill it where the trainer reads it
        canvas.share_memory_()
    for slot, image in zip(canvas, images, strict=True):
        h, w = image.shape[1:]
        slot[:, :h, :w] = image
        slot[:, :h, w] = image[:, :, -1]
        slot[:, h, : w + 1] = slot[:, h - 1, : w + 1]
    boxes = torch.stack([box for (_, box, _), _ in samples])
    flips = torch.tensor([flip for (_, _, flip), _ in samples])
    labels = torch.tensor([label for _, label in samples])
    return (canvas, boxes, flips), labels


def device_crop(
    spec: InputSpec, augment: Mapping[str, Any]
) -> Callable[[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The device's half: cut every box out of the canvas and resize it to the crop size in
    one `roi_align` (bilinear, averaging several samples per output pixel when shrinking, as
    an antialiased resize does), flip, then finish like `device_normalise`."""
    finish = device_normalise(spec, augment)
    size = spec.crop_size

    def crop(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        canvas, boxes, flips = batch
        index = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)
        rois = torch.cat([index[:, None], boxes], dim=1)
        images = roi_align(canvas.float(), rois, size, sampling_ratio=-1, aligned=True)
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        return finish(images.round_().clamp_(0, 255).to(torch.uint8))

    return crop


class Preprocessing:
    """The loaders' transforms for one backbone and one training device, and the device's half.

    `device_transforms` (`auto`: when `on_gpu`; `true`; `normalise`; `false`) moves the float
    conversion, normalisation and random erasing onto the training device. With the default
    augmentation (random resized crop and flip) the crops, resizes and flips run there too:
    loader workers only draw each image's crop box and ship the part of the uint8 image it needs
    (`normalise` keeps the crops in the workers). `tensor_input`: training images come as
    uint8 tensors from the decode cache.
    """

    def __init__(
        self,
        spec: InputSpec,
        augment: Mapping[str, Any],
        device_transforms: bool | str,
        on_gpu: bool,
        tensor_input: bool,
    ) -> None:
        option = device_transforms
        self.on_device = on_gpu if option == "auto" else option in (True, "normalise")
        self.crops_on_device = self.on_device and option != "normalise" and crops_on_device(augment)
        self.eval = eval_transform(spec, normalise=not self.on_device)
        if self.crops_on_device:
            self.train: Callable = CropBox(spec, augment, train_decode_size(spec))
        else:
            self.train = train_transform(
                spec, augment, normalise=not self.on_device, tensor_input=tensor_input
            )
        self.collate_train = collate_crop_samples if self.crops_on_device else None
        self._normalise = {True: device_normalise(spec, augment), False: device_normalise(spec, {})}
        self._crop = device_crop(spec, augment)

    def finish(self, batch: tuple[Any, torch.Tensor], training: bool) -> tuple[Any, torch.Tensor]:
        """A batch on the training device, finished: `(images (B, 3, H, W) float32, labels)`
        when the device does the work; unchanged otherwise."""
        if not self.on_device:
            return batch
        images, labels = batch
        if isinstance(images, (tuple, list)):  # whole images with crop boxes (CropBox)
            return self._crop(images), labels
        return self._normalise[training](images), labels
