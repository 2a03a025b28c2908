"""Predicting the classes of new images with a trained run (`python predict.py`).

The images go through exactly what evaluation does during training: the one decode function
(`finetune.data.load_rgb`: any mode to 8-bit RGB, transparency onto white) and the eval preset of
the weights (`finetune.transforms.eval_transform`: resize, center crop, normalise). The model is
rebuilt from the checkpoint alone (`finetune.module.load_classifier`), offline.

In your own code:

    predictor = load_predictor("outputs/runs/<run>")   # a run dir or a .ckpt file
    result = predictor.predict(["a.jpg", "b.png"])      # probabilities (N, classes)
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune import backbones
from finetune.atomic import atomic_write, write_json
from finetune.calibration import temperature_for
from finetune.cams import CAMS_FOLDER, write_all_cams
from finetune.config import check_fields
from finetune.config.commands import TTA_MODES, PredictConfig

# The three pieces shared with training, each imported here only (they move in the package split).
from finetune.data import load_rgb
from finetune.data.folders import IMG_EXTENSIONS, images_under, report_unread
from finetune.embeddings import EMBEDDINGS_FILE, captured
from finetune.errors import FinetuneError
from finetune.input_spec import InputSpec
from finetune.module import load_classifier
from finetune.prediction_tables import (
    Predictions,
    confusion,
    format_confusion,
    format_table,
    top_k,
    write_csv,
)
from finetune.rundir import find_checkpoint
from finetune.transforms import eval_transform

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# The model: a run dir or a checkpoint file
# ------------------------------------------------------------------------------------------


def input_spec_of(model: nn.Module) -> InputSpec:
    """The preprocessing a trained classifier was evaluated with (its weights' eval preset)."""
    return backbones.input_spec(model.hparams["model"])


def load_model(path: str | Path) -> tuple[nn.Module, InputSpec, list[str]]:
    """`(classifier in eval mode on the CPU, its InputSpec, class names)` from a run dir or a
    `.ckpt`. Raises `FinetuneError` for a missing or unreadable checkpoint."""
    checkpoint = find_checkpoint(path)
    try:
        with _quiet(backbones.log):  # the rebuild's "random initialisation" is not news here
            model = load_classifier(checkpoint)
    except FinetuneError:
        raise
    except Exception as error:  # truncated file, not a checkpoint of this project, ...
        # Only the error's type: torch's message runs to several lines and advises
        # weights_only=False, which would run code pickled into an untrusted file.
        raise FinetuneError(
            f"Cannot read the checkpoint {checkpoint}: damaged or not a checkpoint of this "
            f"project ({type(error).__name__}). Fix: pass a complete checkpoint written by "
            "train.py (a run dir, or its checkpoints/*.ckpt)."
        ) from error
    log.info(
        "Loaded %s (%s, %d classes)",
        checkpoint,
        model.hparams["model"]["name"],
        len(model.class_names),
    )
    return model.eval(), input_spec_of(model), list(model.class_names)


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """`logger`'s info messages left out for the duration."""
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------
# Inputs: files, folders (recursively) and globs; class folders give labels
# ------------------------------------------------------------------------------------------


# What a folder of inputs is searched for: training's image types and GIF (its first frame, as
# `load_rgb` decodes it); files of other image types (.heic ...) are named in a warning.
PREDICTED_TYPES = (*IMG_EXTENSIONS, ".gif")


@dataclass
class Inputs:
    """The image files to predict, in order, and the true class index of those found in class
    folders (a folder whose sub-folders are all class names of the model)."""

    files: list[Path]
    labels: dict[Path, int] = field(default_factory=dict)


def collect_inputs(inputs: str | Sequence[str], class_names: Sequence[str]) -> Inputs:
    """Expand files, folders (recursively: image extensions, hidden files left out) and glob
    patterns (`*`, `?`, `[..]`, `**`) into image files, without duplicates. Raises
    `FinetuneError` when nothing is found."""
    patterns = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs or [])
    found = Inputs(files=[])
    missing = []
    for pattern in (os.path.expanduser(str(p)) for p in patterns):
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
        paths = [Path(m) for m in matches] or ([Path(pattern)] if Path(pattern).exists() else [])
        if not paths:
            missing.append(pattern)
        for path in paths:
            if path.is_dir():
                found.files += images_under(path, PREDICTED_TYPES)
                report_unread(path, [path], PREDICTED_TYPES)
                found.labels |= _class_folder_labels(path, class_names)
            else:  # a file named on purpose is tried whatever its extension
                found.files.append(path)
    found.files = list(dict.fromkeys(found.files))
    if not found.files:
        where = ", ".join(str(p) for p in patterns) or "(none given)"
        hint = f" ({', '.join(missing)} matched nothing)" if missing else ""
        raise FinetuneError(
            f"No images found in inputs={where}{hint}. Fix: pass image files, folders or a "
            "quoted glob, e.g. inputs=photos/ or 'inputs=photos/*.jpg' or 'inputs=[a.jpg,b.png]'."
        )
    if missing:
        log.warning("Nothing found for: %s", ", ".join(missing))
    return found


def _class_folder_labels(folder: Path, class_names: Sequence[str]) -> dict[Path, int]:
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0] != ".")
    if not subfolders:
        return {}
    unknown = [name for name in subfolders if name not in class_names]
    if unknown:
        log.info(
            "%s is not read as class folders: %s not among the model's classes",
            folder,
            ", ".join(unknown[:5]),
        )
        return {}
    index = {name: i for i, name in enumerate(class_names)}
    return {path: index[name] for name in subfolders for path in images_under(folder / name)}


# ------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------


class _ImageFiles(Dataset):
    """Decoded and eval-preprocessed images; an unreadable file yields its error, not a crash."""

    def __init__(self, files: Sequence[Path], transform) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_rgb(str(self.files[index]))
        except Exception as error:  # PIL raises many types for broken files
            return index, None, f"{type(error).__name__}: {error}"
        return index, self.transform(image).as_subclass(torch.Tensor), None


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(i, image) for i, image, _ in samples if image is not None]
    errors = {i: reason for i, image, reason in samples if image is None}
    images = torch.stack([image for _, image in good]) if good else None
    return [i for i, _ in good], images, errors


def _check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise FinetuneError(f"Unknown tta '{tta}'. Valid choices: {', '.join(TTA_MODES)}.")


@dataclass
class Predictor:
    """A trained classifier with its eval preprocessing and class names. `temperature`
    divides the logits before the softmax (fitted on the val split after training,
    `finetune.calibration`; 1.0: the model's own probabilities); it never changes the order of
    the classes."""

    model: nn.Module
    input_spec: InputSpec
    class_names: list[str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.transform = eval_transform(self.input_spec)
        self.model = self.model.to(self.device).eval()

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, tta: str = PredictConfig.tta) -> torch.Tensor:
        """Softmax of a preprocessed batch `(N, 3, crop, crop)`'s logits over `temperature`;
        `tta="flip"` averages it with that of the mirrored images. Returns `(N, classes)`
        float32 on the CPU."""
        _check_tta(tta)
        images = images.to(self.device, non_blocking=True)
        probs = (self.model(images).float() / self.temperature).softmax(dim=1)
        if tta == "flip":
            flipped = self.model(images.flip(-1)).float() / self.temperature
            probs = (probs + flipped.softmax(dim=1)) / 2
        return probs.cpu()

    def predict(
        self,
        files: Iterable[str | Path],
        batch_size: int = PredictConfig.batch_size,
        tta: str = PredictConfig.tta,
        num_workers: int = 0,
        embeddings: bool = False,
        layer: str | None = None,
    ) -> Predictions:
        """Decode, preprocess and classify `files` in batches; unreadable ones are skipped
        and listed, never fatal. With `embeddings`, also one vector per image from the same
        forward pass (of the image as given, not its mirror): the head's input, or the pooled
        output of the module named `layer` (`finetune.embeddings.captured`)."""
        _check_tta(tta)
        files = [Path(f) for f in files]
        loader = DataLoader(
            _ImageFiles(files, self.transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        kept, chunks, vectors, unreadable = [], [], [], {}
        with captured(self.model, layer) if embeddings else nullcontext([]) as found:
            for indices, images, errors in loader:
                unreadable |= {files[i]: reason for i, reason in errors.items()}
                if images is not None:
                    kept += [files[i] for i in indices]
                    chunks.append(self.probabilities(images, tta))
                    if embeddings:  # the first forward pass: the image, not its mirror
                        vectors.append(found[0].cpu())
                        found.clear()
        classes = len(self.class_names)
        probabilities = torch.cat(chunks) if chunks else torch.empty(0, classes)
        result = Predictions(kept, probabilities, unreadable)
        if embeddings:
            result.embeddings = torch.cat(vectors) if vectors else torch.empty(0, 0)
        return result


def pick_device(device: str = PredictConfig.device) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU. Raises `FinetuneError` for a device
    name torch does not know or a GPU this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    if chosen is None or (chosen.type == "cuda" and not torch.cuda.is_available()):
        raise FinetuneError(
            f"Cannot predict on device={device}: "
            + ("no CUDA GPU is visible here" if chosen is not None else "not a torch device")
            + ". Fix: device=auto (the GPU when there is one), device=cpu or device=cuda:0."
        )
    return chosen


def load_predictor(path: str | Path, device: str = PredictConfig.device) -> Predictor:
    """The one-liner: a trained classifier from a run dir or `.ckpt`, ready to predict, with
    the temperature fitted for that checkpoint (`finetune.calibration.temperature_for`)."""
    model, spec, class_names = load_model(path)
    temperature = temperature_for(find_checkpoint(path))
    if temperature != 1.0:
        log.info("Probabilities calibrated by the run's temperature %.4g", temperature)
    return Predictor(model, spec, class_names, pick_device(device), temperature)


def require(cfg: Any, keys: Sequence[str], example: str) -> None:
    """Raise `FinetuneError` naming the first of `keys` left unset (`???`) in `cfg`, with
    `example` as the fix (Hydra's MissingMandatoryValue would be a traceback)."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key):
            raise FinetuneError(f"{key} is not set. Fix: {example}")


def check_settings(cfg: Any) -> None:
    """The settings of `python predict.py`, checked before the model is loaded: the values
    the schema allows (`ConfigError`) and an output that is not a folder."""
    require(cfg, ["ckpt", "inputs"], PREDICT_EXAMPLE)
    check_fields(cfg, PredictConfig)
    wanted = cfg.get("output")
    if wanted and Path(str(wanted)).expanduser().is_dir():
        raise FinetuneError(
            f"output={wanted} is a folder; output names the CSV file to write. Fix: "
            f"output={Path(str(wanted)) / 'predictions.csv'}"
        )


PREDICT_EXAMPLE = "python predict.py ckpt=outputs/runs/<run> inputs=photos/"


def save_embeddings(path: Path, result: Predictions) -> Path:
    """`result.embeddings` as a float32 `(N, D)` .npy file, row i the image of row i of
    predictions.csv; written atomically."""
    array = result.embeddings.numpy().astype(np.float32)
    atomic_write(path, lambda handle: np.save(handle, array))
    print(f"Wrote {path} ({array.shape[0]} x {array.shape[1]}, rows as in the CSV)")
    return path


def run(cfg: Any, output_dir: Path) -> dict[str, Any]:
    """`python predict.py`: predict, print the table (and accuracy and confusion matrix for
    class folders), write predictions.csv (and skipped_images.json; embeddings.npy with
    `embeddings`, cams.npy and cams/ with `cam`). Returns a summary.
    Raises `FinetuneError` for a missing or bad setting before loading anything."""
    check_settings(cfg)
    predictor = load_predictor(cfg.ckpt, str(cfg.get("device", PredictConfig.device)))
    inputs = collect_inputs(cfg.inputs, predictor.class_names)
    log.info("Predicting %d image(s) on %s", len(inputs.files), predictor.device)
    layer, batch_size = cfg.get("embeddings_layer"), int(cfg.batch_size)
    embeddings = bool(cfg.get("embeddings")) or layer is not None
    result = predictor.predict(
        inputs.files,
        batch_size,
        str(cfg.tta),
        int(cfg.get("num_workers", 0)),
        embeddings,
        str(layer) if layer is not None else None,
    )
    k = min(int(cfg.top_k), len(predictor.class_names))
    rows = top_k(result, predictor.class_names, k)
    print(format_table(rows))
    labelled = bool(inputs.labels) and all(f in inputs.labels for f in result.files)
    truth = [predictor.class_names[inputs.labels[f]] for f in result.files] if labelled else None
    wanted = cfg.get("output")
    csv_path = Path(str(wanted)).expanduser() if wanted else output_dir / "predictions.csv"
    write_csv(csv_path, rows, k, truth)
    summary: dict[str, Any] = {"predicted": len(result.files), "csv": str(csv_path)}
    if result.embeddings is not None:
        summary["embeddings"] = str(save_embeddings(csv_path.with_name(EMBEDDINGS_FILE), result))
    method = str(cfg.get("cam") or "none")
    if method != "none":
        maps = write_all_cams(
            predictor.model,
            predictor.transform,
            predictor.input_spec,
            result.files,
            csv_path.parent,
            method,
            batch_size,
        )
        print(f"Wrote {maps} and an overlay per image in {maps.parent / CAMS_FOLDER}")
        summary["cams"] = str(maps)
    if result.unreadable:
        listing = "\n".join(f"  {p} ({reason})" for p, reason in result.unreadable.items())
        print(f"Skipped {len(result.unreadable)} unreadable file(s):\n{listing}")
        write_json(
            csv_path.with_name("skipped_images.json"),
            {str(p): r for p, r in result.unreadable.items()},
        )
    summary["unreadable"] = [str(p) for p in result.unreadable]
    if inputs.labels:
        accuracy, matrix, counted = confusion(result, inputs.labels, len(predictor.class_names))
        print(f"Accuracy on {counted} image(s) in class folders: {accuracy:.4f}")
        print(format_confusion(matrix, predictor.class_names))
        summary |= {"accuracy": accuracy, "confusion_matrix": matrix.tolist()}
    print(f"Wrote {csv_path}")
    return summary
