"""Image decoding: THE one function that turns an image file into pixels (`load_rgb`), used by
training, evaluation, the decode cache, the feature cache, verification and the reports' grid
of misclassified images, so every consumer sees the same RGB pixels of a file: the pixels an
image viewer shows (upright, colour-managed, transparency over white; see `to_rgb`).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from finetune.input_spec import InputSpec
from finetune.transforms import eval_resize, train_decode_size

log = logging.getLogger(__name__)

try:  # Pillow built without LittleCMS decodes without colour management
    from PIL import ImageCms

    SRGB = ImageCms.createProfile("sRGB")
except ImportError:  # pragma: no cover - depends on the Pillow build
    ImageCms, SRGB = None, None


# Part of the feature cache key: bump whenever `load_rgb` gives other pixels for the same file, so
# that features extracted from the old pixels are not reused. 2: EXIF orientation, ICC profiles.
DECODER_VERSION = 2

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _scaled_to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale as 8-bit "L" by its full range (PIL's own conversion would
    clip every level above 255 to white): 16-bit level 51400 becomes 200."""
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode in SIXTEEN_BIT_MODES or pixels.max() > 255 else 255.0
    if image.mode == "F" and pixels.max() <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour part of `image` (L, RGB, CMYK or another colour mode PIL converts to RGB) and
    its alpha channel, or None when it is opaque. Palette and colour-key transparency (PNG tRNS,
    GIF) count as alpha."""
    if image.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        return _scaled_to_8_bit(image), None
    if image.mode == "1":
        return image.convert("L"), None
    if image.mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif "transparency" in image.info and image.mode in ("L", "RGB"):
        image = image.convert("LA" if image.mode == "L" else "RGBA")
    if image.mode in ALPHA_MODES:
        image = image.convert("LA" if image.mode in ("LA", "La") else "RGBA")
        return image.convert(image.mode[:-1]), image.getchannel("A")
    return image, None


@lru_cache(maxsize=64)
def _to_srgb_transform(icc_profile: bytes, mode: str) -> Any:
    """LittleCMS transform from an embedded profile to sRGB (one per profile and mode), with the
    profile's own rendering intent, as colour-managed viewers do. None when it cannot be built
    (a damaged profile or one of another colour space than the pixels): a viewer ignores it."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        intent = ImageCms.getDefaultIntent(source)
        return ImageCms.buildTransform(source, SRGB, mode, "RGB", renderingIntent=intent)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as error:
        log.debug("Ignoring an embedded colour profile that cannot be used (%s)", error)
        return None


def _colour_to_srgb(colour: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """8-bit sRGB pixels of `colour`: through its embedded ICC profile when there is one (an
    Adobe RGB or CMYK photo shows in its real colours), else PIL's conversion."""
    if icc_profile and SRGB is not None and colour.mode in ("RGB", "L", "CMYK"):
        transform = _to_srgb_transform(icc_profile, colour.mode)
        if transform is not None:
            return ImageCms.applyTransform(colour, transform)
    return colour.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB pixels an image viewer shows for `image` (as opened by PIL):

    - the first frame of an animated or multi-page file;
    - turned upright by its EXIF orientation (`ImageOps.exif_transpose`);
    - colours converted to sRGB through an embedded ICC profile (when PIL has LittleCMS);
    - transparency (alpha, palette, PNG colour key) composited onto white;
    - 16/32-bit greyscale scaled by its full range, CMYK, palette and greyscale converted.

    `image` itself is left as given except for its current frame."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    icc_profile = image.info.get("icc_profile")
    upright = image
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        upright = ImageOps.exif_transpose(image)  # a copy, with mode, palette and info kept
    colour, alpha = _split_alpha(upright)
    rgb = _colour_to_srgb(colour, icc_profile)
    if alpha is None:
        return rgb
    rgba = rgb.convert("RGBA")
    rgba.putalpha(alpha)
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# Pillow refuses to open an image of more than twice `Image.MAX_IMAGE_PIXELS` pixels (a guard
# against decompression bombs in files from strangers): 178,956,970 pixels by default.
DEFAULT_MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


class ImageTooLarge(OSError):
    """A valid image with more pixels than the limit allows (`data.max_image_pixels`)."""


def allow_pixels(limit: int | None) -> None:
    """Decode images of up to `limit` pixels (None: any size) in this process and the data
    loader workers it forks (Pillow's `MAX_IMAGE_PIXELS`, which warns above half the limit)."""
    Image.MAX_IMAGE_PIXELS = None if limit is None else max(limit // 2, 1)


def pixel_limit() -> int | None:
    """The largest number of pixels `load_rgb` decodes now (None: no limit)."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def load_rgb(path: str) -> Image.Image:
    """The whole file at `path` decoded as the 8-bit RGB pixels a viewer shows (see `to_rgb`):
    THE decode function of every consumer. A JPEG above Pillow's default pixel limit (allowed
    by `allow_pixels`) is decoded at a reduced size that fits under it (`Image.draft`).

    Raises `ImageTooLarge` for an image above the pixel limit, and what PIL raises for a file
    that is missing, truncated or not an image (`OSError`, `SyntaxError`, `ValueError`, ...)."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(
            f"{error} It is a valid image above the pixel limit that guards against "
            "decompression bombs, not a corrupt file"
        ) from None
    with image:
        pixels = image.width * image.height
        if pixels > DEFAULT_MAX_IMAGE_PIXELS and image.format == "JPEG":
            scale = 2 ** math.ceil(math.log2(math.sqrt(pixels / DEFAULT_MAX_IMAGE_PIXELS)))
            image.draft("RGB", (image.width // scale, image.height // scale))
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
