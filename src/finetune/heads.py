"""Where each family keeps its classifier, what that classifier sees, and its blocks.

A network's classifier is found through the family's own API, never guessed from module types:
timm's `get_classifier()` (one module, or a tuple for several heads: a distilled DeiT's `head`
and `head_dist`, LeViT's), torchvision's known head attribute per family (`fc`,
`classifier.1`, `heads.head`, ...). What the classifier sees, its pre-logit features, is timm's
`forward_head(forward_features(x), pre_logits=True)`, and for torchvision the input of the head
attribute. A classifier is served when it is, apart from dropout, one affine map of these
features: an `nn.Linear`, a 1x1 `nn.Conv2d` over `(N, C, 1, 1)` (DLA), or a `BatchNorm1d`
followed by a Linear (LeViT's `NormLinear`). Several heads that see the same features and whose
outputs the network averages are served when the network's output is that average (timm's
distilled models in eval and in non-distillation training).

`head_layout` refuses, in one line naming the model and what is unsupported, any other head,
before anything trains.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError

# torchvision's classifier per family (the family is the model name's prefix).
TORCHVISION_HEADS: dict[tuple[str, ...], str] = {
    ("resnet", "resnext", "wide_resnet", "regnet", "shufflenet", "inception", "googlenet"): "fc",
    ("mobilenet_v2", "efficientnet", "mnasnet"): "classifier.1",
    ("mobilenet_v3",): "classifier.3",
    ("convnext",): "classifier.2",
    ("vgg", "alexnet"): "classifier.6",
    ("maxvit",): "classifier.5",
    ("densenet",): "classifier",
    ("vit_",): "heads.head",
    ("swin",): "head",
}
# torchvision families whose classifier is no affine map of pooled features.
UNSERVED_TORCHVISION = {
    "squeezenet": "its classifier is a 1x1 Conv2d followed by a ReLU and the pooling",
}

# Blocks of torchvision families, in timm's group-matcher format: each regex's numeric capture
# orders the blocks; (99999,) is timm's MATCH_PREV_GROUP: the layers between the last stage and
# the head (a final norm, a pre-logits linear) join the top block.
TORCHVISION_BLOCK_MATCHERS: dict[tuple[str, ...], dict[str, Any]] = {
    ("resnet", "resnext", "wide_resnet"): {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"},
    ("regnet",): {"stem": r"^stem", "blocks": r"^trunk_output\.block(\d+)"},
    ("mobilenet", "efficientnet", "convnext"): {
        "blocks": [(r"^features\.(\d+)", None), (r"^classifier", (99999,))]
    },
    ("mnasnet",): {"blocks": [(r"^layers\.(\d+)", None), (r"^classifier", (99999,))]},
    ("densenet",): {
        "stem": r"^features\.(?:conv0|norm0)",
        "blocks": [
            (r"^features\.denseblock(\d+)", None),
            (r"^features\.transition(\d+)", None),
            (r"^features\.norm5", (99999,)),
        ],
    },
    ("swin",): {"blocks": [(r"^features\.(\d+)", None), (r"^norm", (99999,))]},
    ("maxvit",): {
        "stem": r"^stem",
        "blocks": [(r"^blocks\.(\d+)", None), (r"^classifier", (99999,))],
    },
    ("pit_",): {  # timm's PiT: stages of transformer blocks, each after its pooling
        "stem": r"^patch_embed|^pos_embed|^cls_token",
        "blocks": [(r"^transformers\.(\d+)", None), (r"^norm", (99999,))],
    },
    ("vit_",): {
        "stem": r"^conv_proj|^class_token|^encoder\.pos_embedding",
        "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)", None), (r"^encoder\.ln", (99999,))],
    },
}


def torchvision_block_matcher(name: str, net: nn.Module) -> dict[str, Any]:
    """The block matcher of a family without timm's `group_matcher` (torchvision's, timm's
    PiT); any other: each top-level child with parameters is a block, in registration order
    (networks register them input first). Tensors on the root module (a class token, a
    position embedding) join the first block: they enter at the input."""
    for prefixes, matcher in TORCHVISION_BLOCK_MATCHERS.items():
        if name.startswith(prefixes):
            return matcher
    blocks = [
        rf"^{re.escape(child)}\."
        for child, module in net.named_children()
        if next(module.parameters(), None) is not None
    ]
    on_root = [rf"^{re.escape(n)}$" for n, _ in net.named_parameters(recurse=False)]
    stem = ([blocks.pop(0)] if blocks else []) + on_root
    matcher: dict[str, Any] = {"stem": "|".join(stem)} if stem else {}
    return matcher | {"blocks": [(block, (index,)) for index, block in enumerate(blocks)]}


@dataclass(frozen=True)
class HeadLayout:
    """Where a network's classifier sits: `names`, the classifier modules as the network names
    them (several for distilled models, whose outputs the network averages); `timm`: the
    pre-logit features come from timm's `forward_head(pre_logits=True)` (else from a hook on
    the input of the one classifier)."""

    names: tuple[str, ...]
    timm: bool


def is_timm(net: nn.Module) -> bool:
    return all(
        hasattr(net, attr) for attr in ("get_classifier", "forward_head", "reset_classifier")
    )


def affine_parts(classifier: nn.Module) -> tuple[nn.BatchNorm1d | None, nn.Linear | nn.Conv2d]:
    """A served classifier's norm (None: none) and its affine layer. Raises `ValueError` for
    any other classifier (described in the message)."""
    layers = [m for m in classifier.modules() if next(m.parameters(False), None) is not None]
    kinds = [type(m).__name__ for m in layers]
    *norms, affine = layers or [classifier]
    served_affine = isinstance(affine, nn.Linear) or (
        isinstance(affine, nn.Conv2d) and affine.kernel_size == (1, 1) and affine.groups == 1
    )
    if served_affine and not norms:
        return None, affine
    if served_affine and len(norms) == 1 and isinstance(norms[0], nn.BatchNorm1d):
        return norms[0], affine
    raise ValueError(
        f"a {type(classifier).__name__} ({' + '.join(kinds) or 'no parameters'}); served: "
        "one Linear, 1x1 Conv2d or BatchNorm1d + Linear per head module (a distilled model's "
        "heads as separate modules)"
    )


def in_features(classifier: nn.Module) -> int:
    """The width of the pre-logit features a served classifier takes."""
    norm, affine = affine_parts(classifier)
    if norm is not None:
        return norm.num_features
    return affine.in_features if isinstance(affine, nn.Linear) else affine.in_channels


def apply(classifier: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Logits `(N, classes)` of a served classifier from `(N, D)` pre-logit features."""
    if isinstance(affine_parts(classifier)[1], nn.Conv2d):
        return classifier(features[:, :, None, None]).flatten(1)
    return classifier(features)


def _module_names(net: nn.Module, modules: Iterable[nn.Module]) -> tuple[str, ...]:
    by_id = {id(module): name for name, module in net.named_modules()}
    return tuple(by_id[id(module)] for module in modules)


def _heads_in(classifier: nn.Module) -> tuple[nn.Module, ...]:
    """The heads a classifier module averages (timm's RepViT: `head` and `head_dist`, each a
    BatchNorm1d + Linear), when it is not served itself and each of them is; else itself."""
    parts = tuple(m for m in classifier.children() if next(m.parameters(), None) is not None)
    try:
        affine_parts(classifier)
        return (classifier,)
    except ValueError:
        try:
            return (
                parts if len(parts) > 1 and all(affine_parts(p) for p in parts) else (classifier,)
            )
        except ValueError:
            return (classifier,)


def head_layout(net: nn.Module, name: str) -> HeadLayout:
    """The classifier of `net` (model `name`), found through its family's API. Raises
    `FinetuneError` (one line: the model and what is unsupported) for a head that cannot be
    served."""
    if is_timm(net):
        found = net.get_classifier()
        classifiers = tuple(found) if isinstance(found, tuple | list) else _heads_in(found)
        layout = HeadLayout(_module_names(net, classifiers), timm=True)
    else:
        for family, reason in UNSERVED_TORCHVISION.items():
            if name.startswith(family):
                raise FinetuneError(f"Model {name} is not supported: {reason}.")
        attribute = next(
            (head for prefixes, head in TORCHVISION_HEADS.items() if name.startswith(prefixes)),
            None,
        )
        if attribute is None:  # a family this table does not know: its last Linear
            linears = [n for n, module in net.named_modules() if isinstance(module, nn.Linear)]
            if not linears:
                raise FinetuneError(
                    f"Model {name} is not supported: no classifier found (no nn.Linear)."
                )
            attribute = linears[-1]
        layout = HeadLayout((attribute,), timm=False)
    for head in layout.names:
        if head == "":
            raise FinetuneError(f"Model {name} is not supported: no separate classifier module.")
        try:
            affine_parts(net.get_submodule(head))
        except ValueError as error:
            raise FinetuneError(
                f"Model {name} is not supported: its classifier '{head}' is {error}."
            ) from None
    return layout


def with_bias(net: nn.Module, layout: HeadLayout) -> None:
    """Give every classifier's Linear a bias (torchvision's maxvit builds its head without one):
    the solved probe has one, and the new head loads no pretrained tensor anyway."""
    for head in layout.names:
        affine = affine_parts(net.get_submodule(head))[1]
        if isinstance(affine, nn.Linear) and affine.bias is None:
            name = next(n for n, m in net.named_modules() if m is affine)
            parent, _, child = name.rpartition(".")
            biased = nn.Linear(affine.in_features, affine.out_features)
            setattr(net.get_submodule(parent) if parent else net, child, biased)


def reset_heads(net: nn.Module, layout: HeadLayout) -> None:
    """Fresh parameters for the new classifier(s), PyTorch's default initialisation of each
    layer (nn.Linear: +-1/sqrt(features)); several heads start equal, so that they compute
    one classifier until training sets them apart."""
    first = net.get_submodule(layout.names[0])
    for module in first.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for other in layout.names[1:]:
        net.get_submodule(other).load_state_dict(first.state_dict())


def zero_heads(net: nn.Module, layout: HeadLayout) -> None:
    """Set the affine layer of every classifier to zero (its norm, if any, is kept)."""
    for head in layout.names:
        affine = affine_parts(net.get_submodule(head))[1]
        nn.init.zeros_(affine.weight)
        if affine.bias is not None:
            nn.init.zeros_(affine.bias)


def check_served(network: Any, crop_size: int) -> None:
    """Raise `FinetuneError` unless the network's logits are its classifiers applied to its
    pre-logit features (`network.forward_head(network.forward_features(x))`), checked in eval
    mode on one fixed image (no random numbers are drawn)."""
    ramp = torch.linspace(-1.0, 1.0, crop_size)
    image = torch.stack(
        [
            ramp[:, None] * ramp[None, :],
            ramp[:, None].expand(-1, crop_size),
            ramp[None, :].expand(crop_size, -1),
        ]
    )[None]
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            logits = network(image)
            try:
                rebuilt = network.forward_head(network.forward_features(image))
            except (RuntimeError, ValueError, TypeError, IndexError) as error:
                raise FinetuneError(
                    f"Model {network.name} is not supported: its classifier "
                    f"({', '.join(network.head_names)}) cannot be applied to the features it "
                    f"sees ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})."
                ) from error
    finally:
        network.train(was_training)
    if (
        not isinstance(logits, torch.Tensor)
        or logits.shape != rebuilt.shape
        or not torch.allclose(
            logits, rebuilt, rtol=1e-3, atol=1e-4 * (1.0 + float(logits.abs().max()))
        )
    ):
        raise FinetuneError(
            f"Model {network.name} is not supported: its output is not its classifier "
            f"({', '.join(network.head_names)}) applied to the features that classifier sees."
        )
