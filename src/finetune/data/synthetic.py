"""The generated dataset: shapes (circle / square / stripes) on noisy backgrounds, so the whole
pipeline runs offline. The shape is the class; colours and placement vary."""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SYNTHETIC_CLASSES = ("circle", "square", "stripes")


def _draw_synthetic(class_name: str, size: int, rng: random.Random) -> Image.Image:
    """A shape on a noisy background; the shape is the class, colours and placement vary."""
    background = tuple(rng.randrange(0, 90) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(rng.randrange(140, 256) for _ in range(3))
    extent = rng.randrange(size // 3, int(size * 0.8))
    left, top = rng.randrange(0, size - extent), rng.randrange(0, size - extent)
    box = (left, top, left + extent, top + extent)
    if class_name == "circle":
        draw.ellipse(box, fill=colour)
    elif class_name == "square":
        draw.rectangle(box, fill=colour)
    else:
        step = max(size // 8, 2)
        for y in range(rng.randrange(0, step), size, 2 * step):
            draw.rectangle((0, y, size, y + step - 1), fill=colour)
    return image


def generate_synthetic(folder: Path, recipe: Mapping[str, Any]) -> None:
    """`folder/{train,val,test}/<class>/*.png` and `folder/recipe.json` from `recipe` (classes,
    `<split>_per_class`, `image_size` in pixels, `seed`), replacing what was there."""
    log.info("Generating the synthetic dataset in %s", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(recipe["seed"])
    # Built beside the target and renamed into place, so a crash never leaves half a dataset.
    staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=folder.parent))
    for split in ("train", "val", "test"):
        for class_name in recipe["classes"]:
            class_dir = staging / split / class_name
            class_dir.mkdir(parents=True)
            for index in range(int(recipe[f"{split}_per_class"])):
                image = _draw_synthetic(class_name, int(recipe["image_size"]), rng)
                image.save(class_dir / f"{class_name}_{index:04d}.png")
    (staging / "recipe.json").write_text(json.dumps(dict(recipe)))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
