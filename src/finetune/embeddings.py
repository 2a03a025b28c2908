"""The fine-tuned network as a feature extractor: one vector per image from the same forward
pass that classifies it (`python predict.py embeddings=true`).

By default the vector is what the head sees, the pre-logit features (`Network.forward_features`,
the vectors the feature cache of the linear probe stores): the head applied to it gives the
logits. `layer=<module name>` takes the output of another module of the network instead (a
block, as `network.net.named_modules()` names it: `layer3` of a resnet, `blocks.5` of a timm
EfficientNet, `encoder.layers.encoder_layer_6` of a torchvision ViT), averaged over its spatial
positions `(N, C, H, W) -> (N, C)` or its tokens `(N, T, C) -> (N, C)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from finetune.errors import FinetuneError

EMBEDDINGS_FILE = "embeddings.npy"


def network_of(model: nn.Module) -> nn.Module:
    """The `finetune.backbones.Network` inside a trained classifier (or `model` itself)."""
    return getattr(model, "network", model)


def pooled(output: torch.Tensor) -> torch.Tensor:
    """One vector per image from a module's output: `(N, C, H, W)` averaged over H and W,
    `(N, T, C)` (a transformer's tokens) over T, `(N, C)` as it is. Float32."""
    if output.ndim == 4:
        return output.float().mean(dim=(2, 3))
    if output.ndim == 3:
        return output.float().mean(dim=1)
    return output.float().flatten(1)


def block_names(network: nn.Module, limit: int = 40) -> list[str]:
    """Module names worth offering as `embeddings_layer`: the network's children and their
    children (`layer4`, `blocks.5`, `features.7`), at most `limit`."""
    names = [
        name
        for name, _module in network.net.named_modules()
        if name and name.count(".") <= 1 and not name.split(".")[-1].startswith("act")
    ]
    return names[:limit]


@contextmanager
def captured(model: nn.Module, layer: str | None = None) -> Iterator[list[torch.Tensor]]:
    """While open, every forward pass of `model` appends one `(N, D)` float32 tensor to the
    yielded list: the input of its (first) classifier (the pre-logit features) or, with
    `layer`, the pooled output of the module of that name. Raises `FinetuneError` naming some
    valid names for a layer the network does not have."""
    network = network_of(model)
    found: list[torch.Tensor] = []
    if layer is None:
        classifier = network.classifiers()[0]
        hook = classifier.register_forward_hook(
            lambda _m, inputs, _out: found.append(inputs[0].detach().float())
        )
    else:
        try:
            module = network.net.get_submodule(layer)
        except AttributeError:
            names = ", ".join(block_names(network))
            raise FinetuneError(
                f"The network {network.name} has no module '{layer}' for embeddings_layer. Some "
                f"of its modules: {names}. Fix: embeddings_layer=<one of them>, or leave it "
                "out for the features the head sees."
            ) from None
        hook = module.register_forward_hook(
            lambda _m, _inputs, output: found.append(pooled(output.detach()))
        )
    try:
        yield found
    finally:
        hook.remove()
