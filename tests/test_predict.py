"""predict.py as a user runs it, on checkpoints of 1-epoch runs and on real photos."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import make_class_folders, read_csv, real_photos, run_entry
from finetune.config import ConfigError, check_command_line
from finetune.data import ImageListDataset
from finetune.errors import FinetuneError
from finetune.predict import (
    collect_inputs,
    find_checkpoint,
    load_model,
    load_predictor,
    pick_device,
)
from finetune.predict import run as predict_run
from finetune.transforms import eval_transform


def test_class_folders_get_accuracy_and_confusion_matrix_and_a_broken_file_is_skipped(
    lite0_run, tmp_path
):
    photos = tmp_path / "photos"
    real_photos(photos)
    (photos / "bees" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    result = run_entry(
        "predict.py", f"ckpt={lite0_run}", f"inputs={photos}", f"hydra.run.dir={out}", "top_k=5"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 6 and not any("broken" in row["path"] for row in rows)
    assert set(rows[0]) == {"path", "label_1", "score_1", "label_2", "score_2", "true_label"}
    for row in rows:  # top_k=5 is cut to the 2 classes; probabilities sum to one
        assert {row["label_1"], row["label_2"]} == {"ants", "bees"}
        assert float(row["score_1"]) >= float(row["score_2"])
        assert float(row["score_1"]) + float(row["score_2"]) == pytest.approx(1, abs=1e-5)
        assert row["true_label"] == Path(row["path"]).parent.name
        assert Path(row["path"]).name in result.stdout  # the table
    correct = sum(row["label_1"] == row["true_label"] for row in rows)
    assert f"Accuracy on 6 image(s) in class folders: {correct / 6:.4f}" in result.stdout
    for true in ("ants", "bees"):
        counts = [
            sum(r["true_label"] == true and r["label_1"] == p for r in rows)
            for p in ("ants", "bees")
        ]
        assert any(line.split() == [true, *map(str, counts)] for line in result.stdout.splitlines())
    assert "broken.jpg" in result.stdout
    skipped = json.loads((out / "skipped_images.json").read_text())
    assert list(skipped) == [str(photos / "bees" / "broken.jpg")]


def test_predictions_equal_the_evaluation_path_of_training(lite0_run, tmp_path):
    files = real_photos(tmp_path, class_folders=False)
    predictor = load_predictor(lite0_run, device="cpu")
    result = predictor.predict(files, batch_size=4)
    # Training evaluates through ImageListDataset with the eval preset of the weights.
    dataset = ImageListDataset([(str(f), 0) for f in files], eval_transform(predictor.input_spec))
    images = torch.stack([dataset[i][0] for i in range(len(files))])
    with torch.inference_mode():
        expected = (predictor.model(images) / predictor.temperature).softmax(dim=1)
    assert result.files == files
    torch.testing.assert_close(result.probabilities, expected, atol=1e-6, rtol=0)


def test_tta_flip_averages_the_image_and_its_mirror(lite0_run, tmp_path):
    files = real_photos(tmp_path, per_class=2, class_folders=False)
    predictor = load_predictor(lite0_run, device="cpu")
    plain = predictor.predict(files).probabilities
    flipped = predictor.predict(files, tta="flip").probabilities
    images = torch.stack([predictor.transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        mirror = (predictor.model(images.flip(-1)) / predictor.temperature).softmax(dim=1)
    torch.testing.assert_close(flipped, (plain + mirror) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(flipped, plain, atol=1e-4)  # the mirror changes the answer
    with pytest.raises(FinetuneError, match="flip"):
        predictor.predict(files, tta="rotate")


def test_a_device_that_is_not_there_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(FinetuneError, match="device=cuda: no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(FinetuneError, match="device=gpu: not a torch device"):
        pick_device("gpu")


def test_a_run_dir_means_its_best_checkpoint(lite0_run):
    best = find_checkpoint(lite0_run)
    metrics = json.loads((lite0_run / "metrics.json").read_text())
    assert best.name == Path(metrics["best_checkpoint"]).name != "last.ckpt"


def test_inputs_expand_folders_globs_and_lists_and_none_found_is_one_clear_error(tmp_path):
    make_class_folders(tmp_path / "shots", {"ants": 2, "wasps": 1})
    (tmp_path / "shots" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "shots" / "notes.txt").write_text("not an image")
    found = collect_inputs(str(tmp_path / "shots"), ["ants", "bees"])
    assert len(found.files) == 3 and found.labels == {}  # wasps: not the model's class folders
    labelled = collect_inputs(str(tmp_path / "shots" / "ants" / ".."), ["ants", "bees", "wasps"])
    assert sorted(labelled.labels.values()) == [0, 0, 2]
    globbed = collect_inputs([str(tmp_path / "shots" / "**" / "ants_*.jpg")], ["ants"])
    assert [f.name for f in globbed.files] == ["ants_0.jpg", "ants_1.jpg"]
    with pytest.raises(FinetuneError, match=r"No images found in inputs=.*\*\.png matched nothing"):
        collect_inputs(str(tmp_path / "*.png"), ["ants"])


def test_a_missing_checkpoint_is_one_line_and_exit_status_1(tmp_path):
    result = run_entry(
        "predict.py",
        f"ckpt={tmp_path / 'nowhere'}",
        f"inputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    assert result.returncode == 1
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "nowhere does not exist" in errors[0] and "Fix:" in errors[0]
    assert "Traceback" not in result.stderr


def test_predict_finds_in_a_folder_exactly_the_images_training_would(tmp_path):
    from finetune.data.folders import images_under

    for name in ("a.jpg", ".b.jpg", ".hidden/c.jpg", "d.txt", "sub/e.PNG", "._f.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    expected = [tmp_path / "a.jpg", tmp_path / "sub" / "e.PNG"]
    assert images_under(tmp_path) == expected
    assert collect_inputs(str(tmp_path), []).files == expected


def predict_cfg(**values):
    """conf/predict.yaml's keys as Hydra composes them (its schema), with `values` set."""
    from finetune.config.schema import PredictConfig

    cfg = OmegaConf.structured(PredictConfig)
    for key, value in values.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("predict", [], "Config key `ckpt` has no value. Fix: add ckpt=..."),
        ("export", [], "Config key `ckpt` has no value. Fix: add ckpt=..."),
        ("predict", ["ckpt=r", "inputs=p", "+topk=2"], "cannot be added with `+`"),
        ("predict", ["ckpt=r", "inputs=p", "batch_size=abc"], "`batch_size`: it takes int"),
        ("predict", ["ckpt=r", "inputs=p", "batch_size=0"], "below its minimum 1"),
        ("predict", ["ckpt=r", "inputs=p", "num_workers=-1"], "below its minimum 0"),
        ("predict", ["ckpt=r", "inputs=p", "tta=flp"], "Did you mean `flip`?"),
        ("export", ["ckpt=r", "opset=5"], "`opset=5` is below its minimum 7"),
        ("export", ["ckpt=r", "chek=false"], "Did you mean `check`?"),
        ("export", ["ckpt=r", "format=tflite"], "not one of: onnx, torchscript"),
    ],
)
def test_a_wrong_setting_of_predict_or_export_is_refused_with_its_fix(script, args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_command_line(args, config_name=script)


def test_predict_and_export_to_a_named_file_leave_no_hydra_folder_in_the_working_dir(
    lite0_run, tmp_path
):
    """With output=F the file is all they write: no outputs/<command>/<time>/ of Hydra's own."""
    photos, work = tmp_path / "photos", tmp_path / "work"
    real_photos(photos, per_class=1)
    work.mkdir()
    csv_file, onnx_file = tmp_path / "p.csv", tmp_path / "m.onnx"
    predicted = run_entry(
        "predict.py", f"ckpt={lite0_run}", f"inputs={photos}", f"output={csv_file}", cwd=work
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    exported = run_entry("export.py", f"ckpt={lite0_run}", f"output={onnx_file}", cwd=work)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert len(read_csv(csv_file)) == 2 and onnx_file.is_file()
    assert list(work.iterdir()) == []
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "predict.log").exists()
    assert "Loaded" in predicted.stdout  # the log still reaches the console


@pytest.mark.parametrize(
    ("script", "listed", "not_listed"),
    [
        ("train.py", ["model: ", "efficientnet_lite0", "strategy: "], ["base_"]),
        ("predict.py", ["ckpt: ", "top_k: "], ["strategy: ", "model: ", "base_"]),
        ("export.py", ["ckpt: ", "format: "], ["strategy: ", "model: ", "base_"]),
    ],
)
def test_help_lists_what_the_command_takes_only(script, listed, not_listed, tmp_path):
    """The schema's base_* nodes are never chosen on a command line; predict and export
    compose no training group."""
    result = run_entry(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(text in result.stdout for text in listed), result.stdout
    assert not any(text in result.stdout for text in not_listed), result.stdout


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("predict.py", ["ckpt=r", "inputs=p", "topk=2"], "Did you mean `top_k`?"),
        ("export.py", [], "Config key `ckpt` has no value. Fix: add ckpt=..."),
    ],
)
def test_the_scripts_print_that_one_line_before_anything_loads(script, args, message, tmp_path):
    result = run_entry(script, *args, f"hydra.run.dir={tmp_path}/out")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "out").exists()


def test_an_output_that_is_a_folder_is_refused_before_the_model_loads(tmp_path):
    cfg = OmegaConf.create({"ckpt": "nowhere", "inputs": "x", "top_k": 3, "tta": "none"})
    cfg.output = str(tmp_path)
    with pytest.raises(FinetuneError, match=r"is a folder; .* Fix: output=.*predictions\.csv"):
        predict_run(cfg, tmp_path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"inputs": "???"}, r"^inputs is not set\. Fix: python predict\.py ckpt=.* inputs="),
        # the schema's values, worded as the command line's check words them
        ({"top_k": 0}, r"^Config key `top_k=0` is below its minimum 1\. Fix: e\.g\. top_k=1\."),
        ({"top_k": -1}, r"^Config key `top_k=-1` is below its minimum 1\."),
        ({"tta": "flipp"}, r"^`tta=flipp` is not one of: none, flip\. Did you mean `flip`\?"),
        ({"batch_size": 0}, r"^Config key `batch_size=0` is below its minimum 1\."),
    ],
)
def test_settings_are_checked_before_the_checkpoint_is_read(values, message, tmp_path):
    # The checkpoint does not exist: each error must come before anything is loaded.
    cfg = predict_cfg(
        **({"ckpt": str(tmp_path / "nowhere.ckpt"), "inputs": str(tmp_path)} | values)
    )
    with pytest.raises(FinetuneError, match=message) as raised:
        predict_run(cfg, tmp_path)
    assert "\n" not in str(raised.value)


def test_a_damaged_checkpoint_is_one_line_naming_the_file(lite0_run, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"garbage")
    truncated = tmp_path / "truncated.ckpt"
    whole = find_checkpoint(lite0_run).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    for damaged in (garbage, truncated):
        with pytest.raises(FinetuneError) as raised:
            load_model(damaged)
        message = str(raised.value)
        assert "\n" not in message and f"checkpoint {damaged}:" in message and "Fix:" in message
        assert "weights_only" not in message


def test_loading_logs_the_checkpoint_not_a_random_initialisation(lite0_run, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    load_model(lite0_run)
    logged = caplog.text
    assert str(find_checkpoint(lite0_run)) in logged and "efficientnet_lite0" in logged
    assert "random initialisation" not in logged
