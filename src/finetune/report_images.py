"""The images of the evaluation report, drawn with PIL (matplotlib's import alone would cost a
cached linear probe a fifth of its run time): the confusion matrix, or for many classes a sorted
view of the worst classes and their top confusions, and the grid of misclassified images.

Every image stays bounded in size whatever the number of classes, with text at `FONT_SIZE` or
larger: a 102-class matrix has no room for readable names or counts, so it is drawn as the
sorted view (see `confusion_image`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from finetune.confusion import class_ranking, confused_pairs

FONT_SIZE = 11  # the smallest text drawn; names and counts stay readable at this size
FULL_MATRIX_MAX_CLASSES = 40  # above this, cells would drop below MIN_CELL: the sorted view
MIN_CELL = 16  # pixels of a matrix cell: a row label of FONT_SIZE fits its row
SORTED_VIEW_ROWS = 30  # the worst classes the sorted view lists
SORTED_VIEW_CONFUSIONS = 3  # top confusions shown per listed class
NAME_CHARS = 24  # class names are cut to this many characters in the matrix
SORTED_VIEW_COLUMNS = (230, 300)  # pixels of the sorted view's name and confusion columns
ROW_HEIGHT = 20  # pixels per class in the sorted view


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class MatrixLayout(NamedTuple):
    """How a full confusion matrix of `classes` classes is drawn: `cell` pixels per cell,
    `counts` whether the counts are written in the cells."""

    cell: int
    counts: bool


def matrix_layout(classes: int) -> MatrixLayout | None:
    """The full matrix's layout, or None when `classes` exceeds `FULL_MATRIX_MAX_CLASSES` and
    `confusion_image` draws the sorted view instead."""
    if classes > FULL_MATRIX_MAX_CLASSES:
        return None
    return MatrixLayout(max(MIN_CELL, min(48, 720 // max(classes, 1))), classes <= 20)


def _shade(share: float) -> tuple[int, int, int]:
    return tuple(int(255 - share * (255 - c)) for c in (8, 48, 107))  # white -> blue


def confusion_image(matrix: torch.Tensor, class_names: list[str], title: str) -> np.ndarray:
    """The `(classes, classes)` confusion `matrix` (rows true classes, columns predicted) as an
    `(height, width, 3)` uint8 RGB array: the full matrix, shaded by the share of the row with
    the counts in the cells, up to `FULL_MATRIX_MAX_CLASSES` classes; above that, the sorted
    view of `sorted_view_image`. Either is at most about 1200 pixels a side."""
    layout = matrix_layout(len(class_names))
    if layout is None:
        return sorted_view_image(matrix, class_names, title)
    n, cell, font = len(class_names), layout.cell, _font()
    names = [name[:NAME_CHARS] for name in class_names]
    margin_left = 16 + 7 * max(len(name) for name in names)
    margin_top = 40 + 7 * max(len(name) for name in names)
    width, height = margin_left + max(n * cell, 230) + 10, margin_top + n * cell + 24
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill="black", font=_font(14))
    shares = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    for true in range(n):
        for pred in range(n):
            share = float(shares[true, pred])
            x, y = margin_left + pred * cell, margin_top + true * cell
            draw.rectangle(
                (x, y, x + cell - 1, y + cell - 1), fill=_shade(share), outline=(220, 220, 220)
            )
            if layout.counts:
                text_colour = "white" if share > 0.5 else "black"
                count = str(int(matrix[true, pred]))
                draw.text((x + 3, y + cell // 3), count, fill=text_colour, font=font)
    for index, name in enumerate(names):
        draw.text((6, margin_top + index * cell + cell // 3), name, fill="black", font=font)
        label = Image.new("RGB", (7 * len(name) + 8, 14), "white")
        ImageDraw.Draw(label).text((0, 0), name, fill="black", font=font)
        rotated = label.rotate(90, expand=True)
        canvas.paste(
            rotated, (margin_left + index * cell + cell // 3, margin_top - rotated.height - 4)
        )
    draw.text(
        (margin_left, height - 18), "predicted ->   (rows: true class)", fill="gray", font=font
    )
    return np.asarray(canvas)


def _fit(text: str, width: float, font: ImageFont.ImageFont) -> str:
    """`text`, cut (ending in "~") to at most `width` pixels in `font`."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "~") > width:
        text = text[:-1]
    return text + "~"


def sorted_view_image(matrix: torch.Tensor, class_names: list[str], title: str) -> np.ndarray:
    """The worst `SORTED_VIEW_ROWS` classes of the confusion `matrix`, worst first, one row
    each: name, accuracy (shaded), images, then its `SORTED_VIEW_CONFUSIONS` most frequent
    wrong predictions as `name: count (share of the class)`. `(height, width, 3)` uint8 RGB;
    its size depends on neither the number of classes nor the length of their names (names
    are cut to their column, `SORTED_VIEW_COLUMNS` pixels)."""
    rows = class_ranking(matrix, class_names)[:SORTED_VIEW_ROWS]
    mistakes: dict[str, list[dict]] = {}  # true class -> its confusions, most frequent first
    for pair in confused_pairs(matrix, class_names, limit=None):
        mistakes.setdefault(pair["true"], []).append(pair)
    font, (name_width, confusion_width) = _font(), SORTED_VIEW_COLUMNS
    columns = [8, 8 + name_width, 8 + name_width + 60, 8 + name_width + 120]
    width = columns[3] + SORTED_VIEW_CONFUSIONS * confusion_width + 8
    top = 52
    canvas = Image.new("RGB", (width, top + len(rows) * ROW_HEIGHT + 8), "white")
    draw = ImageDraw.Draw(canvas)
    heading = f"{title}: the {len(rows)} worst of {len(class_names)} classes"
    draw.text((8, 6), heading, fill="black", font=_font(14))
    headings = ["true class", "accuracy", "images", "most often predicted instead"]
    for x, text in zip(columns, headings, strict=True):
        draw.text((x, top - 18), text, fill="gray", font=font)
    for index, row in enumerate(rows):
        y = top + index * ROW_HEIGHT
        text_y = y + (ROW_HEIGHT - FONT_SIZE) // 2 - 1
        draw.text((columns[0], text_y), _fit(row["class"], name_width - 10, font), "black", font)
        box = (columns[1], y + 1, columns[1] + 52, y + ROW_HEIGHT - 2)
        draw.rectangle(box, fill=_shade(1 - row["acc"]))
        acc_colour = "white" if row["acc"] < 0.5 else "black"
        draw.text((columns[1] + 4, text_y), f"{row['acc']:.2f}", fill=acc_colour, font=font)
        draw.text((columns[2], text_y), str(row["images"]), fill="black", font=font)
        for rank, pair in enumerate(mistakes.get(row["class"], [])[:SORTED_VIEW_CONFUSIONS]):
            x = columns[3] + rank * confusion_width
            box = (x, y + 1, x + confusion_width - 6, y + ROW_HEIGHT - 2)
            draw.rectangle(box, fill=_shade(pair["share"] * 0.6))
            count = f": {pair['count']} ({pair['share']:.0%})"
            name = _fit(pair["predicted"], confusion_width - 12 - font.getlength(count), font)
            draw.text((x + 3, text_y), name + count, fill="black", font=font)
    return np.asarray(canvas)
