"""Metrics that do not hide a class: balanced accuracy, macro-F1 and per-class scores beside
top-1 (metrics.json, TensorBoard, classification_report.txt), the one setting that chooses the
best checkpoint and the probe's L2 (`selection.metric`), the class counts a run prints at its
start, and the sweep summary's macro-F1, selection and diverged columns."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_MODEL, compose_config, folder_overrides, make_class_folders
from finetune import features, probe, summary
from finetune.class_scores import classification_report
from finetune.config import ConfigError, check_command_line
from finetune.imbalance import class_balance_lines
from finetune.reports import best_checkpoint_line
from finetune.resume_config import resumable
from finetune.run import train


def predictions_of(matrix: list[list[int]]) -> tuple[list[int], list[int]]:
    """(true, predicted) class of every image a confusion matrix counts."""
    pairs = [
        (t, p) for t, row in enumerate(matrix) for p, count in enumerate(row) for _ in range(count)
    ]
    return [t for t, _ in pairs], [p for _, p in pairs]


# --- the scores and the report, against scikit-learn on the same predictions ------------------


def test_per_class_scores_and_the_report_are_scikit_learns_on_the_same_predictions():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (60,), generator=generator)
    preds = torch.randint(0, 4, (60,), generator=generator)
    preds[:25] = labels[:25]
    names = ["a", "bee", "crack", "fray"]
    text = classification_report(preds, labels, names, "val: 60 images")
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:7]}
    for index, name in enumerate(names):
        expected = [f"{v:.4f}" for v in (precision[index], recall[index], f1[index])]
        assert rows[name] == [*expected, str(support[index])], name
    lines = text.splitlines()
    assert lines[0] == "val: 60 images" and lines[1].split() == [
        "precision",
        "recall",
        "f1-score",
        "support",
    ]
    by_name = {line[:17].strip(): line[17:].split() for line in lines if line[:17].strip()}
    assert by_name["accuracy"] == [f"{float((preds == labels).float().mean()):.4f}", "60"]
    assert by_name["balanced accuracy"] == [f"{balanced_accuracy_score(labels, preds):.4f}", "60"]
    assert by_name["macro avg"][2] == f"{f1_score(labels, preds, average='macro'):.4f}"
    assert by_name["weighted avg"][2] == f"{f1_score(labels, preds, average='weighted'):.4f}"


# --- the class counts at the start of a run ---------------------------------------------------


def test_class_counts_name_the_ratio_the_weighting_it_would_change_and_thin_val_classes():
    names = ["crack", "fray", "ok"]
    lines = class_balance_lines(names, [40, 8, 120], [10, 2, 30])
    assert lines[0] == (
        "Class counts (train / val): crack 40 / 10, fray 8 / 2, ok 120 / 30. Imbalance ratio "
        "15.0 (largest / smallest training class: ok / fray)."
    )
    hint = lines[1]
    weights = compute_class_weight(
        "balanced", classes=np.arange(3), y=np.repeat([0, 1, 2], [40, 8, 120])
    )
    assert "data.class_weights=balanced" in hint and "15.0 times" in hint
    assert f"fray x{weights[1]:.2f}, ok x{weights[2]:.2f}" in hint  # x7.00, x0.47
    assert "Class 'fray' has 2 val images: its recall moves in steps of 0.5." in lines
    assert not any("'crack'" in line or "'ok'" in line for line in lines)
    # said only without weighting, and from a ratio of 3 on
    for weighting in ("balanced", {"fray": 5.0}):
        assert not any(
            "class_weights" in line
            for line in class_balance_lines(names, [40, 8, 120], [10, 2, 30], weighting)
        )
    assert any(
        "class_weights" in line
        for line in class_balance_lines(names, [40, 8, 120], [10, 2, 30], "none")
    )
    assert not any(
        "class_weights" in line
        for line in class_balance_lines(names, [40, 8, 120], [10, 2, 30], "none", "balanced")
    )
    # k-fold is suggested for few val images, but not to a run that already is one fold
    assert "data.folds=5" in " ".join(class_balance_lines(names, [40, 8, 120], [10, 2, 30]))
    folded = class_balance_lines(names, [40, 8, 120], [10, 2, 30], folds=5)
    assert "too coarse" in " ".join(folded) and "data.folds" not in " ".join(folded)
    assert any(
        "class_weights" in line for line in class_balance_lines(names, [30, 10, 12], [10, 9, 8])
    )
    balanced = class_balance_lines(names, [29, 10, 12], [10, 9, 8])
    assert balanced == [
        "Class counts (train / val): crack 29 / 10, fray 10 / 9, ok 12 / 8. Imbalance ratio 2.9 "
        "(largest / smallest training class: crack / fray)."
    ]


def test_class_counts_of_many_classes_name_the_extremes_and_a_single_val_image():
    names = [f"c{i}" for i in range(20)]
    train_counts = [10] * 20
    train_counts[3], train_counts[7], train_counts[9] = 60, 2, 0  # a class without images
    val_counts = [5] * 20
    val_counts[7] = 1
    lines = class_balance_lines(names, train_counts, val_counts)
    assert lines[0].startswith(
        "Class counts (train / val): 20 classes, 232 / 96 images, largest c3 60 / 5, smallest "
        "c7 2 / 1. Imbalance ratio 30.0"
    )
    assert "Class 'c7' has 1 val image: its recall is 0 or 1." in lines


def test_class_counts_of_even_classes_say_so_instead_of_naming_one_class_twice():
    many = class_balance_lines([f"flower {i}" for i in range(102)], [10] * 102, [10] * 102)
    assert many[0] == (
        "Class counts (train / val): 102 classes, every one with 10 training images, 1020 val "
        "images in all. Every class has as many training images (imbalance ratio 1.0)."
    )
    few = class_balance_lines(["circle", "square"], [8, 8], [2, 2])
    assert few[0] == (
        "Class counts (train / val): circle 8 / 2, square 8 / 2. Every class has as many "
        "training images (imbalance ratio 1.0)."
    )


# --- selection.metric ---------------------------------------------------------------------------


def imbalanced_blobs(counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping Gaussian classes of `counts` images, at a feature scale far from 1."""
    centres = torch.randn(len(counts), 8, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    noise = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(seed)) * 6.0
    return (centres[labels] + noise) * 40 + 7, labels


def test_the_probe_chooses_its_l2_by_the_selection_metric():
    x, y = imbalanced_blobs([200, 12], seed=1)
    val_x, val_y = imbalanced_blobs([100, 6], seed=11)
    by_acc = probe.solve(x, y, 2, val_x, val_y)
    by_f1 = probe.solve(x, y, 2, val_x, val_y, selection="val/macro_f1")
    f1s = [point["val_macro_f1"] for point in by_f1.path]
    chosen = next(point for point in by_f1.path if point["l2"] == by_f1.l2)
    assert chosen["val_macro_f1"] == max(f1s)
    assert by_f1.val_scores["val_macro_f1"] == pytest.approx(max(f1s), abs=1e-6)
    # on these imbalanced classes accuracy picks another strength, of a lower macro-F1
    assert by_acc.l2 != by_f1.l2
    assert by_acc.val_scores["val_macro_f1"] < by_f1.val_scores["val_macro_f1"] - 0.01
    assert by_f1.report()["probe_selected_by"] == "val/macro_f1"
    assert by_acc.report()["probe_selected_by"] == "val/acc"
    with pytest.raises(ValueError, match="selection must be"):
        probe.solve(x, y, 2, val_x, val_y, selection="val/loss")


def test_selection_metric_takes_its_values_and_may_change_on_resume(make_cfg):
    cfg = make_cfg("selection.metric=val/balanced_acc")
    assert cfg.callbacks.model_checkpoint.monitor == "val/balanced_acc"
    default = make_cfg("callbacks=early_stopping")
    assert default.selection.metric == "val/acc"
    assert default.callbacks.model_checkpoint.monitor == "val/acc"
    assert default.callbacks.early_stopping.monitor == "val/acc"
    with pytest.raises(ConfigError, match="val/macro_f1"):
        check_command_line(["selection.metric=val/f1"])
    assert resumable("selection.metric")
    assert resumable("callbacks.model_checkpoint.monitor")
    assert not resumable("callbacks.model_checkpoint.save_top_k")


def test_the_closing_line_names_the_metric_that_chose():
    metrics = {
        "selection_metric": "val/macro_f1",
        "best_checkpoint": "x.ckpt",
        "best_epoch": 3,
        "val/acc": 0.94,
        "val/balanced_acc": 0.88,
        "val/macro_f1": 0.91,
        "test/acc": 0.9,
        "test/balanced_acc": 0.8,
        "test/macro_f1": 0.85,
    }
    assert best_checkpoint_line(metrics) == (
        "Best checkpoint by val/macro_f1 0.9100: epoch 3; val/acc 0.9400, balanced_acc 0.8800, "
        "macro_f1 0.9100; test/acc 0.9000, balanced_acc 0.8000, macro_f1 0.8500."
    )
    final = {"best_checkpoint": "", "best_epoch": 0, "val/acc": 0.5}
    assert best_checkpoint_line(final) == "Final weights (no checkpoint): epoch 0; val/acc 0.5000."


# --- a run ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def empty_memory_cache():
    features.clear_memory_cache()
    yield
    features.clear_memory_cache()


def test_a_run_chooses_by_macro_f1_and_reports_every_class(tmp_path, caplog):
    """lp_ft on an imbalanced folder, chosen by val/macro_f1: the probe's L2, the probe's kept
    checkpoint and the epochs' are ranked by it; the module's torchmetrics numbers are
    scikit-learn's on the gathered predictions; the report and TensorBoard hold them."""
    root = tmp_path / "photos"
    make_class_folders(root, {"big": 24, "mid": 8, "small": 6})
    run_dir = tmp_path / "run"
    overrides = [
        *folder_overrides(root),
        *TINY_MODEL,
        "strategy=lp_ft",
        "augment=none",
        "data.val_fraction=0.34",
        "trainer.max_epochs=2",
        "selection.metric=val/macro_f1",
    ]
    cfg = compose_config(overrides, run_dir, tmp_path)
    with caplog.at_level(logging.INFO):
        metrics = train(cfg)
    assert metrics == json.loads((run_dir / "metrics.json").read_text(), parse_constant=float)
    assert metrics["selection_metric"] == "val/macro_f1"
    names = ["big", "mid", "small"]
    assert "Class counts (train / val): big 16 / 8, mid 5 / 3, small 4 / 2." in caplog.text
    assert "Class 'small' has 2 val images: its recall moves in steps of 0.5." in caplog.text

    # the torchmetrics numbers against scikit-learn on the gathered predictions
    labels, preds = predictions_of(metrics["val/confusion_matrix"])
    assert len(labels) == metrics["split_sizes"]["val"] == 13
    assert metrics["val/balanced_acc"] == pytest.approx(
        balanced_accuracy_score(labels, preds), abs=1e-6
    )
    assert metrics["val/macro_f1"] == pytest.approx(
        f1_score(labels, preds, average="macro", zero_division=0), abs=1e-6
    )
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, zero_division=0)
    for key, expected in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert list(metrics[f"val/{key}_per_class"]) == names
        assert list(metrics[f"val/{key}_per_class"].values()) == pytest.approx(
            expected.tolist(), abs=1e-6
        )
    assert list(metrics["val/recall_per_class"].values()) == pytest.approx(
        list(metrics["val/acc_per_class"].values()), abs=1e-6
    )
    text = (run_dir / "classification_report.txt").read_text()
    assert text == classification_report(
        torch.tensor(preds), torch.tensor(labels), names, "val: 13 images"
    )
    (line,) = [line for line in text.splitlines() if line.startswith("balanced accuracy")]
    assert line.split()[2:] == [f"{metrics['val/balanced_acc']:.4f}", "13"]

    # the probe's L2 by macro-F1, and the checkpoints ranked by it
    path_f1 = [point["val_macro_f1"] for point in metrics["probe_path"]]
    chosen = next(p for p in metrics["probe_path"] if p["l2"] == metrics["probe_l2"])
    assert metrics["probe_selected_by"] == "val/macro_f1" and chosen["val_macro_f1"] == max(path_f1)
    best = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    (state,) = [s for s in best["callbacks"].values() if s.get("monitor") == "val/macro_f1"]
    assert float(state["best_model_score"]) == pytest.approx(metrics["val/macro_f1"], abs=1e-6)
    if metrics["best_epoch"] == -1:  # the probe kept: its file is named by the metric
        assert Path(metrics["best_checkpoint"]).name.startswith("probe-val_macro_f1")
    closing = best_checkpoint_line(metrics)
    assert closing.startswith(f"Best checkpoint by val/macro_f1 {metrics['val/macro_f1']:.4f}: ")
    assert closing in caplog.text

    # every epoch's balanced accuracy and macro-F1 in TensorBoard (and the probe's, at step 0)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag in ("val/balanced_acc", "val/macro_f1"):
        assert len(events.Scalars(tag)) == 3, tag
    assert "best/val/macro_f1" in events.Tags()["scalars"]
    assert "val/classification_report/text_summary" in events.Tags()["tensors"]
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.callbacks.model_checkpoint.monitor == "val/macro_f1"


# --- the sweep summary --------------------------------------------------------------------------


def test_the_sweep_summary_shows_macro_f1_the_selection_and_diverged_runs(tmp_path):
    jobs = {
        "0": (
            {
                "val/acc": 0.9,
                "val/macro_f1": 0.7,
                "test/macro_f1": 0.6,
                "selection_metric": "val/acc",
            },
            None,
        ),
        "1": (
            {
                "val/acc": 0.85,
                "val/balanced_acc": 0.82,
                "val/macro_f1": 0.8,
                "selection_metric": "val/balanced_acc",
            },
            None,
        ),
        "2": ({"val/acc": 0.8}, None),  # a run from before the metric was recorded
        "3": (None, "FinetuneError: Training diverged: the mean training loss of epoch 1 is 1e+03"),
        "4": (
            None,
            "FinetuneError: The training loss became nan at step 5 (epoch 0, batch 5): training diverged.",
        ),
        "5": (None, "FinetuneError: No images found"),
    }
    for job, (metrics, error) in jobs.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job}"]))
        if metrics is not None:
            (tmp_path / job / "metrics.json").write_text(json.dumps(metrics))
        else:
            (tmp_path / job / "failure.json").write_text(json.dumps({"error": error}))
    rows = summary.write_summary(tmp_path)
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "diverged", "diverged", "failed"]
    assert [row.get("selected_by") for row in rows[:3]] == [
        "val/acc",
        "val/balanced_acc",
        "val/acc",
    ]
    assert [row.get("selected_value") for row in rows[:3]] == [0.9, 0.82, 0.8]
    assert [row.get("val_macro_f1") for row in rows[:3]] == [0.7, 0.8, None]
    with (tmp_path / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["val_macro_f1"] for r in table] == ["0.7000", "0.8000", "", "", "", ""]
    assert [r["test_macro_f1"] for r in table][:1] == ["0.6000"]
    assert [r["selected_by"] for r in table][:2] == ["val/acc", "val/balanced_acc"]
    markdown = (tmp_path / "summary.md").read_text()
    assert "6 runs, 3 finished, 3 failed (2 diverged: lower the learning rate)." in markdown
    assert "| val macro f1 | test macro f1 |" in markdown  # the mean +- std over seeds
    assert "0.7500 +- 0.0707" in markdown
