"""A smaller, faster ONNX model for CPUs: static int8 quantization with onnxruntime's tools
(`python export.py format=onnx quantize=int8`).

Weights become int8 per output channel, and activations uint8 with scales calibrated on
training images of the run (the ranges each tensor takes on real inputs), in the QDQ format
(QuantizeLinear/DequantizeLinear pairs around each quantized operator, which onnxruntime fuses
into int8 kernels). The file keeps the float model's input and output, so
`examples/onnx_predict.py` runs it unchanged. The float model's top-1 class is compared with the
int8 model's on the run's val images; the agreement goes into model.json.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data import load_rgb
from finetune.errors import FinetuneError
from finetune.input_spec import InputSpec
from finetune.transforms import eval_transform

log = logging.getLogger(__name__)

MAX_AGREEMENT_IMAGES = 1000  # val images the float and int8 models are compared on
BATCH = 16  # images per calibration and comparison batch
MAX_SIZE_RATIO = 0.35  # int8 file size over float size above which export warns
MIN_AGREEMENT = 0.98  # top-1 agreement with the float model below which export warns


def split_files(checkpoint: Path, split: str, images_root: str | None = None) -> list[Path]:
    """The image files of `split` ("train", "val") of the run a checkpoint belongs to, from
    its run dir's split.json (the folder above `checkpoints/`), under `images_root` when given
    (the images moved), else under the data root the run recorded (a relative one is taken from
    the folder the run was started in, as Hydra recorded it). Raises `FinetuneError` when there
    is no split.json, it lists none, or none of them is there."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    record_file = run_dir / "split.json" if run_dir else None
    if run_dir is None or record_file is None or not record_file.is_file():
        raise FinetuneError(
            f"quantize=int8 calibrates on the run's training images, listed in its run dir's "
            f"split.json; {checkpoint} is not inside a run dir with one. Fix: pass "
            "ckpt=<run dir> of the run that trained it."
        )
    record = json.loads(record_file.read_text())
    root = Path(images_root or record.get("root") or ".").expanduser()
    if not root.is_absolute() and images_root is None:
        root = _started_in(run_dir) / root
    by_class = record.get("files", {}).get(split) or {}
    files = [root / path for paths in by_class.values() for path in paths]
    if not files:
        raise FinetuneError(f"{record_file} lists no {split} images for quantize=int8.")
    if not any(file.is_file() for file in files):
        raise FinetuneError(
            f"quantize=int8 calibrates on the run's {split} images, and none of the "
            f"{len(files)} that {record_file} lists is under {root} (e.g. {files[0]}). Fix: "
            "images_root=<the folder that holds them now, with the run's class folders>."
        )
    return files


def _started_in(run_dir: Path) -> Path:
    """The folder the run was started in (Hydra's `runtime.cwd`), else the current one."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        from omegaconf import OmegaConf

        cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
        if cwd:
            return Path(cwd)
    return Path.cwd()


def _batches(files: Sequence[Path], spec: InputSpec) -> Iterator[tuple[list[Path], np.ndarray]]:
    """`(files, float32 (n, 3, crop, crop))` per batch of `BATCH`, preprocessed as evaluation
    does; unreadable files are left out."""
    transform = eval_transform(spec)
    skipped = []
    for start in range(0, len(files), BATCH):
        kept, arrays = [], []
        for file in files[start : start + BATCH]:
            try:
                arrays.append(transform(load_rgb(str(file))).numpy())
            except Exception as error:  # a file gone or broken since training: skip it
                skipped.append(f"{file} ({error})")
                continue
            kept.append(file)
        if arrays:
            yield kept, np.stack(arrays).astype(np.float32)
    if skipped:
        log.warning(
            "%d of %d images could not be read and were left out, e.g. %s",
            len(skipped),
            len(files),
            skipped[0],
        )


def quantize_int8(
    float_path: Path,
    int8_path: Path,
    calibration_files: Sequence[Path],
    spec: InputSpec,
    input_name: str,
    images: int,
    seed: int = 0,
) -> int:
    """Write the static int8 quantization of the ONNX model at `float_path` to `int8_path`:
    QDQ format, int8 weights per channel, uint8 activations calibrated (min/max) on up to
    `images` of `calibration_files` drawn with `seed`. Returns the number of calibration
    images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    chosen = list(calibration_files)
    random.Random(seed).shuffle(chosen)
    chosen = sorted(chosen[:images])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _batches(chosen, spec)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch[1]}

    # Shape inference and graph fusions first, as onnxruntime advises: quantizing folded
    # BatchNorms and fused activations gives fewer QDQ pairs and better accuracy.
    prepared = int8_path.with_name(int8_path.stem + ".prepared.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # a line per rescaled bias otherwise
    try:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)
    return len(chosen)


def top1_agreement(
    float_path: Path, int8_path: Path, files: Sequence[Path], spec: InputSpec, input_name: str
) -> tuple[float, int]:
    """The share of `files` (up to `MAX_AGREEMENT_IMAGES`) on which the two ONNX models give
    the same top-1 class, and how many images were compared."""
    import onnxruntime

    sessions = [
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for path in (float_path, int8_path)
    ]
    same = total = 0
    for _files, batch in _batches(list(files)[:MAX_AGREEMENT_IMAGES], spec):
        classes = [session.run(None, {input_name: batch})[0].argmax(axis=1) for session in sessions]
        same += int((classes[0] == classes[1]).sum())
        total += len(batch)
    return (same / total if total else 0.0), total


def quantization_report(
    float_path: Path, int8_path: Path, calibrated: int, agreement: float, compared: int
) -> dict[str, Any]:
    """model.json's `quantization` entry, with a warning in the log when the file is larger
    than `MAX_SIZE_RATIO` of the float one or agrees on fewer than `MIN_AGREEMENT`."""
    float_bytes, int8_bytes = float_path.stat().st_size, int8_path.stat().st_size
    ratio = int8_bytes / float_bytes
    report = {
        "type": "int8 static (onnxruntime.quantization.quantize_static)",
        "format": "QDQ",
        "weights": "int8, per channel",
        "activations": "uint8, min/max calibrated",
        "calibration_images": calibrated,
        "float_file_bytes": float_bytes,
        "file_bytes": int8_bytes,
        "size_ratio": round(ratio, 4),
        "top1_agreement": round(agreement, 4),
        "agreement_images": compared,
    }
    log.info(
        "int8 model: %.1f%% of the float model's size; top-1 agrees with it on %.2f%% of %d "
        "val images",
        100 * ratio,
        100 * agreement,
        compared,
    )
    if ratio > MAX_SIZE_RATIO:
        log.warning(
            "The int8 file is %.0f%% of the float one (small models keep more float overhead)",
            100 * ratio,
        )
    if agreement < MIN_AGREEMENT:
        log.warning(
            "The int8 model's top-1 agrees with the float model's on only %.1f%% of the val "
            "images: check its accuracy before deploying it",
            100 * agreement,
        )
    return report
