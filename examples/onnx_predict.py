"""Classify images with a model exported by `python export.py format=onnx`, without finetune-lab
or PyTorch: only onnxruntime, numpy and Pillow.

    python examples/onnx_predict.py outputs/export/<time>_onnx/model.onnx photo1.jpg photo2.png

Reads the JSON written beside the model (`model.json`: class names and preprocessing) and prints
CSV to stdout, in the columns of predict.py's predictions.csv: `path, label_1, score_1, ...`.
Files that cannot be read are skipped and listed on stderr. Copy this file into your own project
as it is; it reproduces the evaluation preprocessing of training pixel for pixel (decode as
training does: first frame, upright by EXIF orientation, sRGB through an ICC profile,
transparency onto white; then resize, center crop, normalise).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import ExifTags, Image, ImageOps

INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "nearest-exact": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
try:  # Pillow built without LittleCMS decodes without colour management, as training does
    from PIL import ImageCms

    SRGB = ImageCms.createProfile("sRGB")
except ImportError:  # pragma: no cover - depends on the Pillow build
    ImageCms, SRGB = None, None


def _scaled_to_8_bit(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale as 8-bit by its full range (PIL's conversion clips above 255)."""
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode in SIXTEEN_BIT_MODES or pixels.max() > 255 else 255.0
    if image.mode == "F" and pixels.max() <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour part of `image` and its alpha channel (None when opaque); palette and
    colour-key transparency count as alpha."""
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


def _colour_to_srgb(colour: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """8-bit sRGB through the embedded ICC profile (LittleCMS, the profile's own rendering
    intent); a profile that cannot be used is ignored, as a viewer does."""
    if icc_profile and SRGB is not None and colour.mode in ("RGB", "L", "CMYK"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            intent = ImageCms.getDefaultIntent(source)
            transform = ImageCms.buildTransform(
                source, SRGB, colour.mode, "RGB", renderingIntent=intent
            )
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            transform = None
        if transform is not None:
            return ImageCms.applyTransform(colour, transform)
    return colour.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB pixels training decodes (`finetune.data.to_rgb`): the first frame, turned
    upright by its EXIF orientation, converted to sRGB through its ICC profile, transparency
    composited onto white, 16/32-bit greyscale scaled by its full range."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    icc_profile = image.info.get("icc_profile")
    upright = image
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        upright = ImageOps.exif_transpose(image)
    colour, alpha = _split_alpha(upright)
    rgb = _colour_to_srgb(colour, icc_profile)
    if alpha is None:
        return rgb
    rgba = rgb.convert("RGBA")
    rgba.putalpha(alpha)
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def preprocess(path: str, spec: dict) -> np.ndarray:
    """One image as the model's input: float32 (3, crop_size, crop_size)."""
    with Image.open(path) as opened:
        image = to_rgb(opened)
    width, height = image.size
    size = spec["resize_size"]
    # The shorter side to `size`, the longer truncated, as torchvision's Resize computes it.
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    image = image.resize(new_size, INTERPOLATIONS[spec["interpolation"]])
    crop = spec["crop_size"]
    left = round((image.width - crop) / 2)
    top = round((image.height - crop) / 2)
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx file (its .json beside it)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    info = json.loads(Path(args.model).with_suffix(".json").read_text())
    spec, class_names = info["preprocessing"], info["class_names"]
    session = onnxruntime.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    k = min(args.top_k, len(class_names))

    writer = csv.writer(sys.stdout)
    writer.writerow(["path"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("label", "score")])
    unreadable = {}
    for start in range(0, len(args.images), args.batch_size):
        paths, inputs = [], []
        for path in args.images[start : start + args.batch_size]:
            try:
                inputs.append(preprocess(path, spec))
            except (
                Exception
            ) as error:  # PIL raises many types for broken files: skip, as predict.py
                unreadable[path] = f"{type(error).__name__}: {error}"
                continue
            paths.append(path)
        if not paths:
            continue
        logits = session.run([info["output"]["name"]], {info["input"]["name"]: np.stack(inputs)})[0]
        # the temperature fitted on the val split after training (1: the model's own)
        calibrated = softmax(logits / info.get("temperature", 1.0))
        for path, probabilities in zip(paths, calibrated, strict=True):
            best = np.argsort(-probabilities, kind="stable")[:k]
            row = [path]
            for index in best:
                row += [class_names[index], round(float(probabilities[index]), 6)]
            writer.writerow(row)
    if unreadable:
        listing = "\n".join(f"  {path} ({reason})" for path, reason in unreadable.items())
        print(f"Skipped {len(unreadable)} unreadable file(s):\n{listing}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
