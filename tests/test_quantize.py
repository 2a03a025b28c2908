"""export.py format=onnx quantize=int8: a static int8 ONNX file calibrated on the run's
training images, its top-1 agreement with the float model computed on val, and the standalone
example running it unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from conftest import REPO, real_photos, run_entry, subprocess_env
from finetune.data import load_rgb
from finetune.predict import load_predictor

STANDALONE = REPO / "examples" / "onnx_predict.py"


def top1(model: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0].argmax(axis=1)


def test_int8_export_is_quantized_smaller_agrees_and_runs_standalone(lite0_run, tmp_path):
    out = tmp_path / "int8"
    result = run_entry(
        "export.py", f"ckpt={lite0_run}", "format=onnx", "quantize=int8", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model, info = out / "model.onnx", json.loads((out / "model.json").read_text())
    report = info["quantization"]
    split = json.loads((lite0_run / "split.json").read_text())
    val = [Path(split["root"]) / p for paths in split["files"]["val"].values() for p in paths]
    train_count = sum(len(paths) for paths in split["files"]["train"].values())
    assert report["calibration_images"] == min(train_count, 200)
    assert report["agreement_images"] == len(val)
    assert report["file_bytes"] == model.stat().st_size
    assert report["size_ratio"] == round(model.stat().st_size / report["float_file_bytes"], 4)
    assert report["size_ratio"] <= 0.35  # int8 weights: about a quarter, plus the graph
    assert info["file"] == "model.onnx" and info["class_names"] == ["ants", "bees"]
    graph = onnx.load(str(model)).graph
    operators = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators  # QDQ
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) > 10

    # the agreement is that of the float export's top-1 on the val images
    float_dir = tmp_path / "float"
    exported = run_entry("export.py", f"ckpt={lite0_run}", f"hydra.run.dir={float_dir}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    transform = load_predictor(lite0_run, device="cpu").transform
    images = np.stack([transform(load_rgb(str(f))).numpy() for f in val])
    same = top1(float_dir / "model.onnx", images) == top1(model, images)
    assert report["top1_agreement"] == round(float(same.mean()), 4)

    photos = real_photos(tmp_path / "photos", per_class=1, class_folders=False)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    standalone = subprocess.run(
        [sys.executable, str(STANDALONE), str(model), *map(str, photos), "--top-k", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    rows = standalone.stdout.strip().splitlines()
    assert len(rows) == 1 + len(photos) and rows[0].startswith("path,label_1,score_1")


def test_int8_of_another_format_is_one_clear_error(lite0_run, tmp_path):
    result = run_entry(
        "export.py",
        f"ckpt={lite0_run}",
        "format=torchscript",
        "quantize=int8",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr  # Hydra's log goes to stdout
    assert "quantizes ONNX files only" in output and "Traceback" not in output


def test_the_calibration_images_are_found_from_where_the_run_started_or_where_they_moved(
    tmp_path, monkeypatch
):
    """split.json keeps the data root as typed: a relative one is taken from the folder the
    run was started in (Hydra's runtime.cwd), not from where export.py runs; images that moved
    are found with images_root=, and none found is one message naming that key."""
    import pytest

    from finetune.errors import FinetuneError
    from finetune.quantize import split_files

    started = tmp_path / "project"
    (started / "photos" / "ants").mkdir(parents=True)
    (started / "photos" / "ants" / "a.jpg").write_bytes(b"x")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {started}\n")
    files = {"train": {"ants": ["ants/a.jpg"]}, "val": {"ants": ["ants/a.jpg"]}}
    (run / "split.json").write_text(json.dumps({"root": "photos", "files": files}))
    checkpoint = run / "checkpoints" / "best.ckpt"
    monkeypatch.chdir(tmp_path)  # export.py started elsewhere

    assert split_files(checkpoint, "train") == [started / "photos" / "ants" / "a.jpg"]
    moved = tmp_path / "moved"
    (started / "photos").rename(moved)
    with pytest.raises(FinetuneError, match="images_root=") as missing:
        split_files(checkpoint, "train")
    assert str(started / "photos") in str(missing.value)
    assert split_files(checkpoint, "val", str(moved)) == [moved / "ants" / "a.jpg"]
