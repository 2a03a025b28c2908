"""Image decoding: THE one function that turns an image file into pixels (`load_rgb`), used by
training, evaluation, the decode cache, the feature cache, verification and the reports' grid
of misclassified images, so every consumer sees the same RGB pixels of a file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from finetune.backbones import InputSpec
from finetune.transforms import eval_resize, train_decode_size

log = logging.getLogger(__name__)

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency composited onto white, 16-bit and 32-bit
    greyscale scaled (PIL's own conversion would clip them), CMYK, palette and greyscale
    converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        if image.mode == "F" and pixels.max() <= 1.0:
            top = 1.0
        scaled = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")  # uint8: greyscale "L"
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """The whole file at `path` decoded as an 8-bit RGB PIL image (see `to_rgb`).

    Raises what PIL raises for a file that is missing, truncated or not an image (`OSError`,
    `SyntaxError`, `ValueError`, ...)."""
    with Image.open(path) as image:
        return to_rgb(image)


class DecodedImages:
    """Decode-once cache: images as uint8 tensors `(3, H, W)`, resized, up to a memory budget
    in MiB.

    Images beyond the budget are not cached and keep streaming from disk. Eval images are stored
    as the eval preset's own resize leaves them (`eval_resize`, whatever the crop mode), so a
    cached image gives the same eval pixels as the file; training images keep their shorter
    side a margin above the crop size for random crops (`train_decode_size`).
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget_bytes = int(budget_mb * 2**20)
        self.used_bytes = 0
        self.images: dict[str, torch.Tensor] = {}
        self.streamed = 0  # images that did not fit in the budget

    def fill(self, paths: list[str], resize: Callable, threads: int) -> None:
        """Decode `paths` in parallel threads (PIL releases the GIL), resized by `resize` (PIL
        image -> PIL image), until the budget is used."""

        def decode(path: str) -> torch.Tensor:
            return F.pil_to_tensor(resize(load_rgb(path)))

        todo = [p for p in dict.fromkeys(paths) if p not in self.images]
        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            for start in range(0, len(todo), 64):
                if self.used_bytes >= self.budget_bytes:
                    self.streamed += len(todo) - start
                    return
                chunk = todo[start : start + 64]
                for path, pixels in zip(chunk, pool.map(decode, chunk), strict=True):
                    if self.used_bytes + pixels.numel() > self.budget_bytes:
                        self.streamed += 1
                        continue
                    self.images[path] = pixels
                    self.used_bytes += pixels.numel()

    def get(self, path: str) -> torch.Tensor | None:
        pixels = self.images.get(path)
        return None if pixels is None else tv_tensors.Image(pixels)


def decode_once(
    spec: InputSpec,
    budget_mb: float,
    train: list[str],
    evaluation: list[list[str]],
    threads: int,
) -> DecodedImages:
    """A decode cache of the `train` paths (at `train_decode_size`) and then of each list of
    `evaluation` paths (at `eval_resize`), within `budget_mb` MiB."""
    decoded = DecodedImages(budget_mb)
    interpolation = InterpolationMode(spec.interpolation)
    decoded.fill(train, v2.Resize(train_decode_size(spec), interpolation, antialias=True), threads)
    for paths in evaluation:
        decoded.fill(paths, eval_resize(spec), threads)
    log.info(
        "Decode cache: %d images in %.0f MB (%d streamed beyond data.decode_cache_mb)",
        len(decoded.images),
        decoded.used_bytes / 2**20,
        decoded.streamed,
    )
    return decoded
