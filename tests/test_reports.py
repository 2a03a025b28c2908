"""Reports that scale past a few classes: top-1 and top-5, per-class accuracy
worst first, the most confused pairs, and a confusion image that stays bounded and readable."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.functional.classification import multiclass_confusion_matrix

from conftest import TINY_MODEL, folder_overrides, make_class_folders
from finetune.confusion import MAX_CONFUSED_PAIRS, confused_pairs
from finetune.report_images import (
    FONT_SIZE,
    FULL_MATRIX_MAX_CLASSES,
    MIN_CELL,
    ROW_HEIGHT,
    SORTED_VIEW_ROWS,
    matrix_layout,
)
from finetune.reports import confusion_image, stage_results
from finetune.run import train

CLASSES = 102


def flowers_like_predictions() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(labels, predictions, names) of 102 classes: class i has 10 images, i % 6 of them
    predicted as class i + 1; class 57 is always taken for class 3; class 100 has no image;
    class 101 has 5 images, 4 of them taken for class 0 (a high share of a small class)."""
    labels, preds = [], []
    for true in range(CLASSES):
        count, wrong, as_class = 10, true % 6, (true + 1) % CLASSES
        if true == 57:
            wrong, as_class = 10, 3
        elif true == 100:
            count = wrong = 0
        elif true == 101:
            count, wrong, as_class = 5, 4, 0
        labels += [true] * count
        preds += [as_class] * wrong + [true] * (count - wrong)
    names = [f"species {index:03d} of a long flower name" for index in range(CLASSES)]
    return torch.tensor(labels), torch.tensor(preds), names


def test_102_classes_rank_worst_first_and_list_the_most_confused_pairs():
    labels, preds, names = flowers_like_predictions()
    matrix = multiclass_confusion_matrix(preds, labels, CLASSES)
    results = stage_results("val", matrix, names)

    ranking = results["val/acc_per_class_sorted"]
    totals = Counter(labels.tolist())
    right = Counter(t for t, p in zip(labels.tolist(), preds.tolist(), strict=True) if t == p)
    expected_order = sorted(totals, key=lambda c: (right[c] / totals[c], c))  # no class 100
    assert [row["class"] for row in ranking] == [names[c] for c in expected_order]
    assert ranking[0] == {"class": names[57], "acc": 0.0, "images": 10}
    assert ranking[1] == {"class": names[101], "acc": pytest.approx(0.2), "images": 5}
    assert [row["acc"] for row in ranking] == sorted(row["acc"] for row in ranking)
    assert len(ranking) == CLASSES - 1  # a class without images has no accuracy to rank
    by_name = results["val/acc_per_class"]
    assert all(by_name[row["class"]] == row["acc"] for row in ranking)
    assert by_name[names[100]] is None

    pairs = results["val/confused_pairs"]
    assert len(pairs) == MAX_CONFUSED_PAIRS
    assert pairs[0] == {"true": names[57], "predicted": names[3], "count": 10, "share": 1.0}
    # Next the 16 classes with 5 of 10 wrong (i % 6 == 5), in label order, then class 101's
    # 4 of 5 (share 0.8) ahead of the 4 of 10 (share 0.4) of classes 4 and 10.
    fives = [c for c in range(CLASSES) if c % 6 == 5 and c != 101]
    assert [(p["true"], p["predicted"], p["count"], p["share"]) for p in pairs[1:17]] == [
        (names[c], names[c + 1], 5, 0.5) for c in fives
    ]
    assert [(p["true"], p["predicted"], p["count"], p["share"]) for p in pairs[17:]] == [
        (names[101], names[0], 4, 0.8),
        (names[4], names[5], 4, 0.4),
        (names[10], names[11], 4, 0.4),
    ]
    everything = confused_pairs(matrix, names, limit=None)  # what the sorted view draws
    assert everything[:MAX_CONFUSED_PAIRS] == pairs
    assert len(everything) == sum(1 for c in totals if right[c] < totals[c])  # one per class
    assert all(pair["true"] != pair["predicted"] for pair in everything)
    # Every count is the matrix's own.
    for pair in pairs:
        true, pred = names.index(pair["true"]), names.index(pair["predicted"])
        assert pair["count"] == int(matrix[true, pred])
        assert pair["share"] == pytest.approx(pair["count"] / totals[true])


def dark_bands(column: np.ndarray) -> list[int]:
    """Heights of the runs of image rows holding dark (text) pixels in `column` (rows, x, 3)."""
    dark = (column.min(axis=2) < 100).any(axis=1)
    bands, run = [], 0
    for row_is_dark in dark:
        if row_is_dark:
            run += 1
        elif run:
            bands.append(run)
            run = 0
    return bands + ([run] if run else [])


@pytest.mark.parametrize("classes", [CLASSES, 1000])
def test_many_classes_draw_a_bounded_sorted_view_with_readable_rows(classes):
    """Above FULL_MATRIX_MAX_CLASSES a matrix cell could not hold a name (at 1000 classes the
    full matrix would be 12,000 pixels wide): the image is the worst classes' rows instead, its
    size independent of the number of classes, each row a line of text of a readable height."""
    generator = torch.Generator().manual_seed(classes)
    labels = torch.arange(classes).repeat(5)
    preds = torch.where(
        torch.rand(len(labels), generator=generator) < 0.3,
        torch.randint(0, classes, (len(labels),), generator=generator),
        labels,
    )
    matrix = multiclass_confusion_matrix(preds, labels, classes)
    names = [f"a rather long class name number {index}" for index in range(classes)]
    image = confusion_image(matrix, names, "val confusion matrix")
    assert matrix_layout(classes) is None
    assert image.shape[0] <= 1200 and image.shape[1] <= 1300 and image.dtype == np.uint8
    assert ROW_HEIGHT >= FONT_SIZE + 4 and FONT_SIZE >= 11
    # The name column: the title, then one line of black text per listed class (the heading is
    # grey), each at least 7 pixels tall (the glyphs of an 11-pixel font).
    bands = dark_bands(image[:, 8:150])
    assert len(bands) == 1 + SORTED_VIEW_ROWS
    assert min(bands[1:]) >= 7


@pytest.mark.parametrize("classes", [3, 20, FULL_MATRIX_MAX_CLASSES])
def test_up_to_forty_classes_draw_the_full_matrix_with_cells_a_name_fits(classes):
    matrix = torch.eye(classes, dtype=torch.long) * 3
    image = confusion_image(matrix, [f"class {i}" for i in range(classes)], "val")
    layout = matrix_layout(classes)
    assert layout.cell >= MIN_CELL >= FONT_SIZE + 4
    assert image.shape[0] > classes * layout.cell and image.shape[1] > classes * layout.cell
    assert layout.counts == (classes <= 20)


def test_a_run_of_six_classes_reports_top5_ranking_and_pairs(make_cfg, tmp_path):
    """End to end: metrics.json holds top-1, top-5, the ranking and the pairs for val and test,
    consistent with its own confusion matrix, and TensorBoard holds them too."""
    root = tmp_path / "photos"
    counts = {f"class{index}": 4 for index in range(6)}
    make_class_folders(root / "train", counts)
    make_class_folders(root / "val", {name: 2 for name in counts}, seed=1)
    make_class_folders(root / "test", {name: 2 for name in counts}, seed=2)
    cfg = make_cfg(*folder_overrides(root), *TINY_MODEL, "optim.optimizer.lr=0.0001", fast=False)
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    mistakes = 0
    for stage in ("val", "test"):
        assert on_disk[f"{stage}/acc_top5"] >= on_disk[f"{stage}/acc"]
        matrix = torch.tensor(on_disk[f"{stage}/confusion_matrix"])
        assert float(matrix.trace() / matrix.sum()) == pytest.approx(on_disk[f"{stage}/acc"])
        ranking = on_disk[f"{stage}/acc_per_class_sorted"]
        assert sorted(row["class"] for row in ranking) == sorted(counts)
        assert [row["acc"] for row in ranking] == sorted(on_disk[f"{stage}/acc_per_class"].values())
        assert all(on_disk[f"{stage}/acc_per_class"][row["class"]] == row["acc"] for row in ranking)
        names = list(on_disk[f"{stage}/acc_per_class"])
        off_diagonal = matrix.clone().fill_diagonal_(0)
        pairs = on_disk[f"{stage}/confused_pairs"]
        assert sum(p["count"] for p in pairs) == int(off_diagonal.sum())  # fewer than 20 pairs
        for pair in pairs:
            true, pred = names.index(pair["true"]), names.index(pair["predicted"])
            assert pair["count"] == int(matrix[true, pred]) > 0
            assert pair["share"] == pytest.approx(pair["count"] / 2)
        assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
        mistakes += len(pairs)
        top5 = f"best/{stage}/acc_top5" if stage == "val" else f"{stage}/acc_top5"
        assert top5 in tags["scalars"], tags["scalars"]
        for key in ("acc_per_class_sorted", "confused_pairs"):
            assert f"{stage}/{key}/text_summary" in tags["tensors"]
    assert mistakes > 0  # a barely trained head: there are confusions to report
    assert {k: v for k, v in metrics.items() if "/" in k} == {
        k: v for k, v in on_disk.items() if "/" in k
    }


def test_debug_overfit_fits_a_batch_of_several_classes_and_says_its_numbers_are_partial(
    make_cfg, tmp_path, monkeypatch, caplog
):
    """The splits list images class by class and Lightning overfits the first batches in loader
    order: debug=overfit must fit a batch of several classes (a bias alone fits a batch of one)
    and say that its val/acc is not the split's accuracy."""
    from finetune.module import ClassifierModule

    for split in ("train", "val"):
        make_class_folders(tmp_path / "photos" / split, {"a": 8, "b": 8}, seed=len(split))
    trained_labels = []
    step = ClassifierModule.training_step

    def recording_step(self, batch, batch_idx):
        trained_labels.append(set(batch[1].tolist()))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ClassifierModule, "training_step", recording_step)
    overrides = [*folder_overrides(tmp_path / "photos"), *TINY_MODEL, "debug=overfit"]
    overrides.append("trainer.max_epochs=2")
    metrics = train(make_cfg(*overrides, fast=False))
    assert trained_labels and all(labels == {0, 1} for labels in trained_labels)
    assert len({frozenset(labels) for labels in trained_labels}) == 1
    rows = [sum(row) for row in metrics["val/confusion_matrix"]]
    assert metrics["val/images"] == sum(rows) == 8 and min(rows) > 0  # one val batch, both classes
    assert metrics["split_sizes"]["val"] == 16
    assert "val/acc" in caplog.text and "on 8 of 16 images" in caplog.text
