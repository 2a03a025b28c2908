"""Classify images with a model exported by `python export.py format=onnx`, without finetune-lab
or PyTorch: only onnxruntime, numpy and Pillow.

    python examples/onnx_predict.py outputs/export/<time>_onnx/model.onnx photo1.jpg photo2.png

Reads the JSON written beside the model (`model.json`: class names and preprocessing) and prints
CSV to stdout, in the columns of predict.py's predictions.csv: `path, label_1, score_1, ...`.
Copy this file into your own project as it is; it reproduces the evaluation preprocessing of
training pixel for pixel (decode to RGB, resize, center crop, normalise).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "nearest-exact": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as training decodes it: transparency onto white, high bit depths scaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        if image.mode == "F" and pixels.max() <= 1.0:
            top = 1.0
        scaled = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        batch = np.stack([preprocess(path, spec) for path in paths])
        logits = session.run([info["output"]["name"]], {info["input"]["name"]: batch})[0]
        for path, probabilities in zip(paths, softmax(logits), strict=True):
            best = np.argsort(-probabilities, kind="stable")[:k]
            row = [path]
            for index in best:
                row += [class_names[index], round(float(probabilities[index]), 6)]
            writer.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
