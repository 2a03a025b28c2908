"""Exporting a trained classifier (`python export.py`): ONNX, TorchScript or a torch.export
ExportedProgram, each with a dynamic batch axis, and beside it a JSON with the class names and
the preprocessing, so that the file runs without this project.

The model's input is a float32 batch `(N, 3, crop_size, crop_size)` preprocessed as
evaluation does (`finetune.predict`); its output the logits `(N, classes)`; softmax gives the
probabilities. `examples/onnx_predict.py` reproduces the preprocessing with Pillow and numpy.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from finetune.atomic import atomic_write, write_json
from finetune.calibration import temperature_for
from finetune.config import check_fields
from finetune.config.commands import EXPORT_SUFFIXES, ExportConfig
from finetune.errors import FinetuneError, unknown_name
from finetune.input_spec import InputSpec
from finetune.predict import find_checkpoint, load_model, require
from finetune.quantize import quantization_report, quantize_int8, split_files, top1_agreement

log = logging.getLogger(__name__)

FORMATS = EXPORT_SUFFIXES  # format -> the suffix of its model file
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def preprocessing(spec: InputSpec) -> dict[str, Any]:
    """Everything needed to turn an image file into the model's input, as plain JSON values.

    It is `finetune.data.load_rgb` followed by `finetune.transforms.eval_transform(spec)`:
    torchvision's Resize of a PIL image (PIL's `resize` with the interpolation named here), then
    its CenterCrop, then `/ 255` and `(x - mean) / std` per channel.
    """
    return {
        "decode": (
            "8-bit RGB as a viewer shows it, in this order: the first frame; turned upright by "
            "its EXIF orientation (Pillow's ImageOps.exif_transpose); colours converted to sRGB "
            "through an embedded ICC profile (LittleCMS via PIL.ImageCms, the profile's default "
            "rendering intent; a profile that cannot be used is ignored); transparency (alpha, "
            "palette, colour key) composited onto white; 16- and 32-bit greyscale scaled to "
            "0..255 by their full range; CMYK, palette and greyscale converted by Pillow"
        ),
        "resize_size": spec.resize_size,
        "resize": (
            "the shorter side to resize_size, the longer to int(resize_size * longer / shorter), "
            "with Pillow's resize and the interpolation below (antialiased)"
        ),
        "interpolation": spec.interpolation,
        "crop_size": spec.crop_size,
        "crop": (
            "center: top = round((height - crop_size) / 2), left = round((width - crop_size) / 2) "
            "(Python's round)"
        ),
        "scale": "pixel / 255.0, float32",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "normalise": "(scaled - mean) / std per channel, RGB order",
        "layout": "NCHW",
    }


def metadata(
    spec: InputSpec,
    class_names: list[str],
    fmt: str,
    file: Path,
    model_cfg: Any,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """The JSON written beside an exported model. `temperature`: what the logits are divided
    by before the softmax (fitted on the val split after training, `finetune.calibration`)."""
    crop = spec.crop_size
    return {
        "format": fmt,
        "file": file.name,
        "class_names": list(class_names),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, crop, crop], "dtype": "float32"},
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(class_names)],
            "dtype": "float32",
            "probabilities": "softmax of logits / temperature over the last axis",
        },
        "temperature": temperature,
        "preprocessing": preprocessing(spec),
        "model": _plain(model_cfg or {}),
        "torch_version": torch.__version__,
    }


def _plain(value: Any) -> Any:
    """A config value as JSON with its type kept (0.5 stays a number, null stays null); what
    JSON cannot hold becomes its text."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _onnx(model: nn.Module, example: torch.Tensor, handle, opset: int) -> None:
    import onnx  # noqa: F401 - the exporter needs it; fail here with its own message if absent

    # The TorchScript-based exporter: the torch.export-based one (dynamo=True) needs onnxscript,
    # which this project does not install. Its deprecation warning is expected.
    # nn.MultiheadAttention's eval fast path (torchvision's ViTs) is one fused operator that
    # ONNX has no counterpart of; the exporter traces the plain computation instead.
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                handle,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def _torchscript(model: nn.Module, example: torch.Tensor, handle, opset: int) -> None:
    # torch.jit is deprecated in favour of torch.export (format=exported_program); TorchScript
    # stays for runtimes that still load it (LibTorch, older mobile runtimes).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, handle)


def _exported_program(model: nn.Module, example: torch.Tensor, handle, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, handle)


WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "exported_program": _exported_program}


def load_exported(path: str | Path, fmt: str):
    """A callable `images (N, 3, H, W) float32 -> logits (N, classes)` on the CPU, from a file
    written by `export_model` (numpy in and out for onnx, tensors otherwise)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # see _torchscript
            return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "exported_program":
        return torch.export.load(str(path)).module()
    raise unknown_name("export format", fmt, list(FORMATS))


def network_of(model: nn.Module) -> nn.Module:
    """The plain network inside a trained classifier (images -> logits): the tracers cannot
    walk a LightningModule (its `trainer` property raises outside a Trainer)."""
    return getattr(model, "network", model)


@dataclass
class Exported:
    model_file: Path
    metadata_file: Path
    max_abs_diff: float | None  # between the written file and PyTorch, on a check batch


def export_model(
    model: nn.Module,
    spec: InputSpec,
    class_names: list[str],
    fmt: str,
    path: str | Path,
    opset: int = ExportConfig.opset,
    check: bool = ExportConfig.check,
    temperature: float = 1.0,
) -> Exported:
    """Write `model` (images -> logits, in eval mode) as `fmt` to `path` and its metadata to
    `path` with suffix `.json`, both atomically. With `check`, run the written file on a batch
    of another size than the traced one (the batch axis is dynamic) and compare its logits with
    PyTorch's. Raises `FinetuneError` for an unknown format or an export that differs."""
    if fmt not in FORMATS:
        raise unknown_name("export format", fmt, list(FORMATS))
    path = Path(path)
    model = model.cpu().eval()
    network = network_of(model)
    example = torch.randn(2, 3, spec.crop_size, spec.crop_size)
    atomic_write(path, lambda handle: WRITERS[fmt](network, example, handle, opset))
    hparams = getattr(model, "hparams", {})
    info = metadata(spec, class_names, fmt, path, hparams.get("model"), temperature)
    metadata_file = write_json(path.with_suffix(".json"), info)
    diff = check_export(model, path, fmt, spec) if check else None
    return Exported(path, metadata_file, diff)


def check_export(model: nn.Module, path: Path, fmt: str, spec: InputSpec) -> float:
    """Max |logits difference| between the file at `path` and `model` on a batch of 3; raises
    `FinetuneError` above 1e-3 of the largest |logit| (and at least 1e-3)."""
    images = torch.randn(3, 3, spec.crop_size, spec.crop_size, generator=torch.manual_seed(0))
    with torch.inference_mode():
        expected = model(images).float()
    run = load_exported(path, fmt)
    if fmt == "onnx":
        got = torch.from_numpy(run(images.numpy()))
    else:
        with torch.inference_mode():
            got = run(images).float()
    diff = float((got - expected).abs().max())
    log.info("Exported %s runs a batch of 3; max |logit difference| to PyTorch %.2e", fmt, diff)
    # float32 rounding grows with the logits' magnitude: 1e-3 of it, and at least 1e-3
    scale = max(1.0, float(expected.abs().max()))
    if diff > 1e-3 * scale:
        raise FinetuneError(
            f"The exported {fmt} model {path} differs from PyTorch by up to {diff:.3g} in the "
            f"logits (largest |logit| {scale:.3g}). Fix: try another format, or another opset "
            "for onnx (opset=...)."
        )
    return diff


def export_int8(
    model: nn.Module,
    spec: InputSpec,
    class_names: list[str],
    path: Path,
    checkpoint: Path,
    opset: int = ExportConfig.opset,
    check: bool = ExportConfig.check,
    temperature: float = 1.0,
    images: int = ExportConfig.calibration_images,
    images_root: str | None = None,
) -> Exported:
    """Export `model` to ONNX (checked against PyTorch), quantize it to int8 calibrated on up
    to `images` training images of `checkpoint`'s run, and write the int8 file to `path` with
    its model.json (the float model's, plus `quantization`: sizes, calibration, top-1 agreement
    with the float model on the run's val images), the images under `images_root` when they
    moved. `finetune.quantize`."""
    calibration = split_files(checkpoint, "train", images_root)
    validation = split_files(checkpoint, "val", images_root)
    with tempfile.TemporaryDirectory() as folder:
        float_path, int8_path = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        exported = export_model(
            model, spec, class_names, "onnx", float_path, opset, check, temperature
        )
        calibrated = quantize_int8(float_path, int8_path, calibration, spec, INPUT_NAME, images)
        agreement, compared = top1_agreement(float_path, int8_path, validation, spec, INPUT_NAME)
        info = json.loads(exported.metadata_file.read_text())
        info["file"] = path.name
        info["quantization"] = quantization_report(
            float_path, int8_path, calibrated, agreement, compared
        )
        atomic_write(path, lambda handle: handle.write(int8_path.read_bytes()))
        metadata_file = write_json(path.with_suffix(".json"), info)
    return Exported(path, metadata_file, exported.max_abs_diff)


def check_output(path: Path, fmt: str) -> None:
    """`FinetuneError` when `path` is a folder or ends with another format's extension (a
    loader picks its reader by the extension)."""
    if path.is_dir():
        raise FinetuneError(
            f"output={path} is a folder; output names the model file to write. Fix: "
            f"output={path / ('model' + FORMATS[fmt])}"
        )
    other = {ext: name for name, ext in FORMATS.items() if name != fmt}
    if path.suffix in other:
        raise FinetuneError(
            f"output={path} ends with {path.suffix}, the extension of {other[path.suffix]} "
            f"files, but format={fmt} writes {FORMATS[fmt]}. Fix: "
            f"output={path.with_suffix(FORMATS[fmt])}, or format={other[path.suffix]}."
        )


def run(cfg: Any, output_dir: Path) -> Exported:
    """`python export.py`: load the checkpoint, export, print where the files are."""
    require(cfg, ["ckpt"], "python export.py ckpt=outputs/runs/<run> format=onnx")
    check_fields(cfg, ExportConfig)  # the values the schema allows, before loading anything
    fmt = str(cfg.format)
    wanted = cfg.get("output")
    path = Path(str(wanted)).expanduser() if wanted else output_dir / f"model{FORMATS[fmt]}"
    check_output(path, fmt)
    quantize = str(cfg.get("quantize", "none"))
    if quantize != "none" and fmt != "onnx":
        raise FinetuneError(
            f"quantize={quantize} quantizes ONNX files only, not format={fmt}. Fix: format=onnx."
        )
    opset = int(cfg.get("opset", ExportConfig.opset))
    model, spec, class_names = load_model(cfg.ckpt)
    checkpoint = find_checkpoint(cfg.ckpt)
    temperature = temperature_for(checkpoint)
    if quantize == "int8":
        exported = export_int8(
            model,
            spec,
            class_names,
            path,
            checkpoint,
            opset,
            bool(cfg.check),
            temperature,
            int(cfg.get("calibration_images", ExportConfig.calibration_images)),
            cfg.get("images_root"),
        )
    else:
        exported = export_model(
            model, spec, class_names, fmt, path, opset, bool(cfg.check), temperature
        )
    print(f"Wrote {exported.model_file}\nWrote {exported.metadata_file}")
    return exported
