"""export.py: the exported files equal PyTorch on real photos, and the ONNX file plus its JSON
alone (no project import, no torch) reproduce predict.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from PIL import ExifTags, Image

from conftest import (
    HYMENOPTERA_VAL,
    REPO,
    read_csv,
    real_photos,
    run_entry,
    subprocess_env,
    train_tiny,
)
from finetune.errors import FinetuneError, UnknownNameError
from finetune.export import export_model, load_exported
from finetune.export import run as export_run
from finetune.predict import load_predictor

STANDALONE = REPO / "examples" / "onnx_predict.py"


@pytest.fixture(scope="session")
def resnet18_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory, "resnet18", "model=resnet18", "model.weights=none")


@pytest.fixture(params=["lite0", "resnet18"])
def trained_run(request) -> Path:
    """Two backbone families with different preprocessing: EfficientNet-Lite (224, bicubic,
    mean = std = 0.5, no resize margin) and torchvision's resnet (256 -> 224, bilinear)."""
    return request.getfixturevalue(f"{request.param}_run")


# A hymenoptera photo with an embedded ICC profile: its sRGB pixels differ from Pillow's plain
# conversion enough to move the probabilities by more than 1e-4.
ICC_PHOTO = HYMENOPTERA_VAL / "ants" / "1119630822_cd325ea21a.jpg"


def odd_photos(folder: Path) -> list[Path]:
    """Real photos plus the cases the decode and crop must get right: an RGBA PNG with
    transparency, a greyscale JPEG, a portrait whose crop margin ends in half a pixel, a photo
    with an ICC profile and a JPEG whose EXIF orientation (6) turns it upright."""
    files = real_photos(folder, per_class=2, class_folders=False)
    with Image.open(ICC_PHOTO) as tagged:
        assert tagged.info.get("icc_profile")
    icc = Path(shutil.copy(ICC_PHOTO, folder / "icc.jpg"))
    with Image.open(files[0]) as photo:
        rgba = photo.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
        rgba.save(folder / "transparent.png")
        photo.convert("L").save(folder / "grey.jpg")
        # Resized to 224 x 337 (lite0) or 256 x 385 (resnet18): a crop margin of 56.5 or 80.5
        # pixels, where Python's round (to even) and rounding half up differ.
        photo.resize((300, 452)).save(folder / "portrait.jpg")
        # Stored lying on its side, with the EXIF tag that a viewer (and training) turns upright.
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = 6
        photo.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif)
    made = ["transparent.png", "grey.jpg", "portrait.jpg", "rotated.jpg"]
    return [*files, icc, *(folder / name for name in made)]


def preprocessed(predictor, files: list[Path]) -> torch.Tensor:
    return torch.stack([predictor.transform(Image.open(f).convert("RGB")) for f in files])


def test_onnx_equals_pytorch_on_real_photos(trained_run, tmp_path):
    predictor = load_predictor(trained_run, device="cpu")
    exported = export_model(
        predictor.model,
        predictor.input_spec,
        predictor.class_names,
        "onnx",
        tmp_path / "model.onnx",
    )
    images = preprocessed(predictor, real_photos(tmp_path / "photos"))  # a batch of 6: dynamic
    with torch.inference_mode():
        expected = predictor.model(images).numpy()
    session = onnxruntime.InferenceSession(str(exported.model_file))
    (got,) = session.run(["logits"], {"images": images.numpy()})
    assert got.shape == (6, 2)
    # float32 logits of a solved probe reach ~100: a relative tolerance as well
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    info = json.loads(exported.metadata_file.read_text())
    spec = predictor.input_spec
    assert info["class_names"] == ["ants", "bees"]
    assert {k: info["preprocessing"][k] for k in ("crop_size", "resize_size", "interpolation")} == {
        "crop_size": spec.crop_size,
        "resize_size": spec.resize_size,
        "interpolation": spec.interpolation,
    }
    assert info["preprocessing"]["mean"] == list(spec.mean)
    assert info["preprocessing"]["std"] == list(spec.std)
    # The model's config with its types: numbers stay numbers, null stays null.
    model_cfg = predictor.model.hparams["model"]
    assert info["model"]["name"] == model_cfg["name"]
    assert info["model"]["min_loaded_fraction"] == model_cfg["min_loaded_fraction"] == 0.5


@pytest.mark.parametrize("fmt", ["torchscript", "exported_program"])
def test_torchscript_and_exported_program_round_trip(lite0_run, tmp_path, fmt):
    predictor = load_predictor(lite0_run, device="cpu")
    exported = export_model(
        predictor.model, predictor.input_spec, predictor.class_names, fmt, tmp_path / "m.bin"
    )
    assert json.loads(exported.metadata_file.read_text())["format"] == fmt
    loaded = load_exported(exported.model_file, fmt)
    for files in (real_photos(tmp_path / "a", per_class=1), real_photos(tmp_path / "b")):
        images = preprocessed(predictor, files)  # batches of 2 and 6
        with torch.inference_mode():
            torch.testing.assert_close(loaded(images), predictor.model(images), atol=1e-5, rtol=0)


def test_unknown_format_lists_the_choices(lite0_run, tmp_path):
    predictor = load_predictor(lite0_run, device="cpu")
    with pytest.raises(UnknownNameError, match="exported_program, onnx, torchscript"):
        export_model(predictor.model, predictor.input_spec, [], "tflite", tmp_path / "m")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"format": "onx"}, r"^`format=onx` is not one of: onnx, .* Did you mean `onnx`\?"),
        ({"opset": 6}, r"^Config key `opset=6` is below its minimum 7\."),
    ],
)
def test_settings_outside_the_schema_are_refused_before_loading(values, message, tmp_path):
    from finetune.config import ConfigError

    cfg = OmegaConf.create({"ckpt": "nowhere", "format": "onnx", "check": True} | values)
    with pytest.raises(ConfigError, match=message):
        export_run(cfg, tmp_path)


# The standalone script runs with `finetune` unimportable; afterwards neither it nor torch
# may have been imported.
GUARD = """
import runpy, sys
sys.modules["finetune"] = None
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
assert not {"finetune", "torch", "torchvision"} & {m for m, v in sys.modules.items() if v}
"""


def test_the_onnx_file_and_its_json_alone_reproduce_predict(lite0_run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    files = odd_photos(photos)
    broken = photos / "broken.jpg"  # listed and skipped by both, not fatal
    broken.write_bytes(b"not a jpeg")
    exported = run_entry(
        "export.py", f"ckpt={lite0_run}", "format=onnx", f"hydra.run.dir={tmp_path / 'export'}"
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    model = tmp_path / "export" / "model.onnx"
    assert model.is_file() and model.with_suffix(".json").is_file()
    predicted = run_entry(
        "predict.py",
        f"ckpt={lite0_run}",
        f"inputs={photos}",
        f"output={tmp_path / 'p.csv'}",
        f"hydra.run.dir={tmp_path / 'predict'}",
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]

    # Only the .onnx and the .json, moved away from the run; a fresh Python, outside the repo.
    alone = tmp_path / "alone"
    alone.mkdir()
    for file in (model, model.with_suffix(".json")):
        file.rename(alone / file.name)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    standalone = subprocess.run(
        [
            sys.executable,
            "-c",
            GUARD,
            str(STANDALONE),
            str(alone / "model.onnx"),
            str(broken),
            *map(str, files),
        ],
        cwd=alone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    assert f"Skipped 1 unreadable file(s):\n  {broken} (" in standalone.stderr
    assert "Traceback" not in standalone.stderr
    theirs = {row["path"]: row for row in read_csv_text(standalone.stdout)}
    ours = {row["path"]: row for row in read_csv(tmp_path / "p.csv")}
    assert set(theirs) == set(ours) == {str(f) for f in files}
    for path, row in ours.items():
        assert theirs[path]["label_1"] == row["label_1"], path
        for key in ("score_1", "score_2"):
            assert float(theirs[path][key]) == pytest.approx(float(row[key]), abs=1e-4), path


def read_csv_text(text: str) -> list[dict[str, str]]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        ("ants.pt", "onnx", r"extension of torchscript files, .* Fix: output=.*ants\.onnx, or"),
        ("ts.onnx", "torchscript", r"format=torchscript writes \.pt\. Fix: output=.*ts\.pt"),
        ("m.pt2", "onnx", r"extension of exported_program files"),
        ("folder", "onnx", r"is a folder; .* Fix: output=.*folder/model\.onnx"),
    ],
)
def test_an_output_of_another_format_or_a_folder_is_refused_before_loading(
    name, fmt, message, tmp_path
):
    (tmp_path / "folder").mkdir()
    output = str(tmp_path / name)
    cfg = OmegaConf.create({"ckpt": "nowhere", "format": fmt, "output": output, "check": True})
    with pytest.raises(FinetuneError, match=message):
        export_run(cfg, tmp_path)
