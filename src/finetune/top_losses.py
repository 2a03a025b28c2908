"""The images the model got most wrong: every evaluated image ranked by its loss (fastai's
`plot_top_losses`), listed in metrics.json and drawn as a grid in TensorBoard.

An image's loss is the cross-entropy of the model's own probabilities (no label smoothing, no
temperature): -log p(true class). The highest losses are the confident mistakes first, then the
unsure ones, then right answers given with little confidence, which is where a look at the
pictures finds wrong labels, ambiguous images and what the model has not learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

from finetune.cams import heatmaps, overlay
from finetune.data import load_rgb
from finetune.report_images import _font
from finetune.transforms import eval_transform

MAX_TOP_LOSSES = 16  # images listed and drawn per evaluated split


def top_losses(
    paths: Sequence[str],
    labels: torch.Tensor,
    logits: torch.Tensor,
    class_names: Sequence[str],
    limit: int = MAX_TOP_LOSSES,
) -> list[dict[str, Any]]:
    """The `limit` images of highest loss, highest first (ties: the earlier image first):
    `{"path", "true", "predicted", "loss", "p_true"}` with class names. `paths[i]`, `labels[i]`
    (class index) and `logits[i]` `(classes,)` belong to the same image."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    losses = F.cross_entropy(logits, labels, reduction="none")
    p_true = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    predicted = logits.argmax(dim=1)
    # A stable sort of the negated losses: equal losses keep the split's order.
    order = torch.sort(-losses, stable=True).indices[:limit].tolist()
    return [
        {
            "path": str(paths[i]),
            "true": class_names[int(labels[i])],
            "predicted": class_names[int(predicted[i])],
            "loss": round(float(losses[i]), 6),
            "p_true": round(float(p_true[i]), 6),
        }
        for i in order
    ]


def top_losses_image(
    entries: list[dict[str, Any]], title: str, pictures: list[Image.Image] | None = None
) -> np.ndarray:
    """`top_losses` entries as a grid of 4 columns, in their order (row by row), each image
    captioned with its true class, its predicted class (red when wrong, green when right) and
    `loss / p(true)`. `(height, width, 3)` uint8 RGB; the images decoded as training does, or
    `pictures[i]` in place of entry i's file (its class activation map)."""
    columns, thumb, caption = 4, 160, 50
    rows = max(1, -(-len(entries) // columns))
    canvas = Image.new(
        "RGB", (columns * (thumb + 8) + 8, 28 + rows * (thumb + caption + 8)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=_font(14))
    font = _font()
    for position, entry in enumerate(entries):
        x = 8 + (position % columns) * (thumb + 8)
        y = 28 + (position // columns) * (thumb + caption + 8)
        picture = pictures[position].copy() if pictures else load_rgb(entry["path"])
        picture.thumbnail((thumb, thumb))
        canvas.paste(picture, (x + (thumb - picture.width) // 2, y + (thumb - picture.height) // 2))
        wrong = entry["true"] != entry["predicted"]
        lines = [
            (f"true: {entry['true'][:22]}", "black"),
            (f"pred: {entry['predicted'][:22]}", "firebrick" if wrong else "darkgreen"),
            (f"loss {entry['loss']:.2f}  p(true) {entry['p_true']:.2f}", "dimgray"),
        ]
        for line, (text, colour) in enumerate(lines):
            draw.text((x, y + thumb + 2 + 15 * line), text, fill=colour, font=font)
    return np.asarray(canvas)


def top_losses_cam_image(
    entries: list[dict[str, Any]], network: nn.Module, title: str, method: str = "gradcam"
) -> np.ndarray:
    """The `top_losses_image` grid of the class activation maps of `network` (a
    `finetune.backbones.Network`) for each image's predicted class, overlaid on what the
    network saw (the eval crop): where it looked when it decided (`finetune.cams`)."""
    spec = network.input_spec
    transform = eval_transform(spec)
    images = torch.stack([transform(load_rgb(entry["path"])) for entry in entries])
    maps = heatmaps(network, images, method)
    pictures = [
        Image.fromarray(overlay(image, heatmap, spec))
        for image, heatmap in zip(images, maps, strict=True)
    ]
    return top_losses_image(entries, title, pictures)
