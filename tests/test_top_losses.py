"""Top losses: the evaluated images ranked by loss in metrics.json and as a grid in
TensorBoard, each with its true and predicted class and p(true)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_calibration import val_logits

from conftest import write_image
from finetune.top_losses import MAX_TOP_LOSSES, top_losses, top_losses_image


def test_images_are_ranked_by_loss_with_their_classes_and_p_true(tmp_path):
    names = ["ants", "bees", "wasps"]
    logits = torch.tensor(
        [
            [4.0, 0.0, 0.0],  # right and sure: the lowest loss
            [0.0, 5.0, 0.0],  # wrong and sure: the highest
            [1.0, 1.0, 1.0],  # unsure: ln 3
            [1.0, 1.0, 1.0],  # the same loss: after the earlier image
            [0.0, 0.0, 2.0],  # wrong, less sure
        ]
    )
    labels = torch.tensor([0, 0, 2, 1, 1])
    paths = [f"image{i}.png" for i in range(5)]
    ranked = top_losses(paths, labels, logits, names)
    assert [entry["path"] for entry in ranked] == [
        "image1.png",
        "image4.png",
        "image2.png",
        "image3.png",
        "image0.png",
    ]
    assert ranked[0] == {
        "path": "image1.png",
        "true": "ants",
        "predicted": "bees",
        "loss": pytest.approx(-math.log(1 / (2 + math.exp(5))), abs=1e-5),
        "p_true": pytest.approx(1 / (2 + math.exp(5)), abs=1e-6),
    }
    assert ranked[2]["loss"] == pytest.approx(math.log(3), abs=1e-5)
    assert ranked[2]["predicted"] == "ants"  # a tie of logits: the first class, as argmax
    for entry in ranked:
        assert entry["loss"] == pytest.approx(-math.log(entry["p_true"]), abs=1e-4)
    assert [e["path"] for e in top_losses(paths, labels, logits, names, limit=2)] == [
        "image1.png",
        "image4.png",
    ]

    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        write_image(tmp_path / f"image{index}.png", colour, size=40, fmt="PNG")
    entries = [dict(e, path=str(tmp_path / f"image{i}.png")) for i, e in enumerate(ranked[:3])]
    grid = top_losses_image(entries, "val: the 3 highest losses")
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    # each image in its cell, in rank order, row by row (cells of 168 pixels, 28 below the title)
    centres = [grid[28 + 80, 8 + column * 168 + 80] for column in range(3)]
    assert [tuple(int(c) for c in centre) for centre in centres] == [
        (200, 30, 30),
        (30, 200, 30),
        (30, 30, 200),
    ]


def test_a_run_lists_its_top_losses_and_draws_them(lite0_run):
    metrics = json.loads((lite0_run / "metrics.json").read_text())
    listed = metrics["val/top_losses"]
    logits, labels = val_logits(lite0_run, metrics["best_checkpoint"])
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert len(listed) == min(MAX_TOP_LOSSES, len(labels))
    assert [e["loss"] for e in listed] == sorted((e["loss"] for e in listed), reverse=True)
    expected = sorted(losses.tolist(), reverse=True)[: len(listed)]
    assert [e["loss"] for e in listed] == pytest.approx(expected, abs=1e-4)
    classes = json.loads((lite0_run / "classes.json").read_text())
    for entry in listed:
        assert {entry["true"], entry["predicted"]} <= set(classes)
        assert entry["path"].endswith(".jpg")
    events = EventAccumulator(str(lite0_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "val/top_losses" in events.Tags()["images"]
    assert "val/misclassified" not in events.Tags()["images"]  # the ranked grid replaced it
