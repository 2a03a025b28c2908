"""Temperature scaling: fitted on the val split after training, ECE before and after in
metrics.json, the reliability diagram in TensorBoard, and predict and export using it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import real_photos
from finetune.calibration import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    reliability_image,
    temperature_for,
)
from finetune.data import ImageListDataset, load_rgb
from finetune.export import export_model
from finetune.module import load_classifier
from finetune.predict import load_predictor
from finetune.reports import calibration_line
from finetune.transforms import eval_transform


def calibrated_logits(images: int = 4000, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true chance of each class (labels drawn from it)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(images, classes, generator=generator) * 1.5
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_an_over_confident_model_gets_a_temperature_that_lowers_its_ece_not_its_top1():
    logits, labels = calibrated_logits()
    over_confident = logits * 10  # the same ranking, ten times too sure
    temperature = fit_temperature(over_confident, labels)
    assert temperature == pytest.approx(10, rel=0.15)  # undoes the factor
    before = expected_calibration_error(over_confident, labels)
    after = expected_calibration_error(over_confident, labels, temperature)
    assert before > 0.2  # about the error rate: top-1 p near 1 whatever the accuracy
    assert after < before / 5
    assert after == pytest.approx(expected_calibration_error(logits, labels), abs=0.02)
    scaled = (over_confident / temperature).softmax(dim=1)
    assert torch.equal(scaled.argmax(dim=1), over_confident.argmax(dim=1))


def test_an_under_confident_model_gets_a_temperature_below_one():
    logits, labels = calibrated_logits()
    temperature = fit_temperature(logits / 4, labels)
    assert temperature == pytest.approx(0.25, rel=0.15)
    assert expected_calibration_error(logits / 4, labels, temperature) < (
        expected_calibration_error(logits / 4, labels) / 3
    )


def test_a_split_without_errors_or_with_broken_logits_keeps_the_models_own_probabilities(
    caplog,
):
    # Every image right: the loss falls without end as T goes to 0, and every probability
    # would become 1. Half right, half wrong with the same margin: the best probabilities
    # are uniform, the fit runs to the upper bound.
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    assert fit_temperature(logits, torch.tensor([0, 1])) == 1.0
    assert "classifies all 2 val images correctly" in caplog.text
    assert fit_temperature(logits.repeat(2, 1), torch.tensor([0, 1, 1, 0])) == 1.0
    assert "outside [0.05, 20]" in caplog.text
    assert fit_temperature(torch.empty(0, 2), torch.empty(0, dtype=torch.long)) == 1.0
    assert fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0])) == 1.0


def test_the_reliability_bins_match_torchmetrics_ece_and_the_diagram_draws():
    logits, labels = calibrated_logits(images=500)
    over_confident = logits * 3
    probabilities = over_confident.softmax(dim=1)
    bins = reliability_bins(probabilities, labels)
    assert len(bins) == ECE_BINS and sum(b["images"] for b in bins) == len(labels)
    ece = sum(
        b["images"] / len(labels) * abs(b["accuracy"] - b["confidence"])
        for b in bins
        if b["images"]
    )
    assert ece == pytest.approx(expected_calibration_error(over_confident, labels), abs=1e-5)
    image = reliability_image(over_confident, labels, 3.0, "val reliability")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    left, right = np.split(image[:, : image.shape[1] // 2 * 2], 2, axis=1)
    assert not np.array_equal(left, right)  # before and after differ


def val_logits(run_dir: Path, checkpoint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's logits and labels on the run's val split, outside Lightning."""
    split = json.loads((run_dir / "split.json").read_text())
    classes = json.loads((run_dir / "classes.json").read_text())
    samples = [
        (str(Path(split["root"]) / path), classes.index(name))
        for name, paths in split["files"]["val"].items()
        for path in paths
    ]
    module = load_classifier(checkpoint)
    dataset = ImageListDataset(samples, eval_transform(module.network.input_spec))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        return module(images), torch.tensor([label for _, label in samples])


def test_a_run_fits_its_temperature_on_val_and_predict_and_export_use_it(lite0_run, tmp_path):
    metrics = json.loads((lite0_run / "metrics.json").read_text())
    logits, labels = val_logits(lite0_run, metrics["best_checkpoint"])
    temperature = metrics["temperature"]
    assert temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert metrics["val/ece"] == pytest.approx(expected_calibration_error(logits, labels), abs=1e-4)
    assert metrics["val/ece_calibrated"] == pytest.approx(
        expected_calibration_error(logits, labels, temperature), abs=1e-4
    )
    assert metrics["val/ece_calibrated"] <= metrics["val/ece"] + 1e-6
    events = EventAccumulator(str(lite0_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "val/reliability" in events.Tags()["images"]

    # predict: the softmax of the logits over the run's temperature, top-1 as the model's
    predictor = load_predictor(lite0_run, device="cpu")
    assert predictor.temperature == temperature
    files = real_photos(tmp_path, per_class=2, class_folders=False)
    calibrated = predictor.predict(files).probabilities
    images = torch.stack([predictor.transform(load_rgb(str(f))) for f in files])
    with torch.inference_mode():
        raw = predictor.model(images)
    torch.testing.assert_close(calibrated, (raw / temperature).softmax(dim=1), atol=1e-6, rtol=0)
    assert torch.equal(calibrated.argmax(dim=1), raw.argmax(dim=1))
    # last.ckpt is not the model the temperature was fitted on
    assert temperature_for(lite0_run / "checkpoints" / "last.ckpt") == 1.0
    assert temperature_for(metrics["best_checkpoint"]) == temperature

    exported = export_model(
        predictor.model,
        predictor.input_spec,
        predictor.class_names,
        "onnx",
        tmp_path / "model.onnx",
        temperature=temperature,
    )
    info = json.loads(exported.metadata_file.read_text())
    assert info["temperature"] == temperature
    assert "temperature" in info["output"]["probabilities"]


def test_the_calibration_line_is_left_out_without_a_fit_and_explains_a_worse_ece():
    assert calibration_line("val", 1.0, 0.2547, 0.2547) is None  # none fitted: said once, why
    better = calibration_line("val", 1.7, 0.12, 0.03)
    assert better == (
        "val: temperature 1.7 (fitted on val's loss) takes the expected calibration error from "
        "0.1200 to 0.0300"
    )
    worse = calibration_line("val", 0.8, 0.5834, 0.5861)
    assert worse.startswith("val: temperature 0.8") and "minimises the val loss, not" in worse
