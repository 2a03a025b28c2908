"""The schemas of `python predict.py` and `python export.py`: their own primary configs
(conf/predict.yaml, conf/export.yaml), registered with the training schema
(`finetune.config.schema.register`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from finetune.config.values import COUNT_FROM_ONE, one_of

TTA_MODES = ("none", "flip")
# format -> the suffix of the model file it writes (a loader picks its reader by the suffix)
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported_program": ".pt2"}
EXPORT_FORMATS = tuple(EXPORT_SUFFIXES)
QUANTIZE_MODES = ("none", "int8")
# predict.py cam=<method>: pytorch-grad-cam's methods (finetune.cams.METHODS)
CAM_METHODS = (
    "gradcam",
    "gradcam++",
    "hirescam",
    "xgradcam",
    "layercam",
    "eigencam",
    "eigengradcam",
    "scorecam",
)


@dataclass
class PredictConfig:
    ckpt: str = MISSING  # a run dir (its best checkpoint) or a .ckpt file
    # a file, a folder (searched recursively), a glob ('photos/*.jpg'), or a list [a.jpg,b/]
    inputs: Any = MISSING
    # classes shown and written per image (at most the number of classes)
    top_k: int = field(default=3, metadata=COUNT_FROM_ONE)
    # none | flip: average the probabilities of the image and its mirror image
    tta: str = field(default="none", metadata=one_of(*TTA_MODES))
    batch_size: int = field(default=64, metadata=COUNT_FROM_ONE)
    num_workers: int = field(default=2, metadata=one_of(types=(int,), minimum=0))  # decoding
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda | cuda:1 ...
    output: str | None = None  # the CSV to write; null = predictions.csv in the Hydra run dir
    # write embeddings.npy beside the CSV: (N, D) features, row-aligned with predictions.csv
    embeddings: bool = False
    # the module whose pooled output they are (e.g. layer3, blocks.5); null: what the head sees
    embeddings_layer: str | None = None
    # none | gradcam | gradcam++ | ...: an overlay PNG per image in cams/ and the maps in cams.npy
    cam: str = field(default="none", metadata=one_of("none", *CAM_METHODS))


@dataclass
class ExportConfig:
    ckpt: str = MISSING  # a run dir (its best checkpoint) or a .ckpt file
    # onnx (model.onnx) | torchscript (model.pt) | exported_program (model.pt2)
    format: str = field(default="onnx", metadata=one_of(*EXPORT_FORMATS))
    output: str | None = None  # the model file to write; null = model.<ext> in the Hydra run dir
    # ONNX opset version (torch.onnx exports 7 to 23)
    opset: int = field(default=17, metadata=one_of(types=(int,), minimum=7))
    check: bool = True  # run the written file once and compare it with PyTorch (max |diff|)
    # none | int8: static int8 quantization of the ONNX file, calibrated on training images
    quantize: str = field(default="none", metadata=one_of(*QUANTIZE_MODES))
    calibration_images: int = field(default=200, metadata=COUNT_FROM_ONE)  # for quantize=int8
    # where the run's images are now, when they moved since training (split.json's paths are
    # relative to the data root it recorded); null = that root
    images_root: str | None = None
