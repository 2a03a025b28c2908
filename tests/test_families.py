"""The family matrix: one small member of each torchvision and timm family, offline.

Each network's own random state dict (with its original head) is its weights file
(`model.weights=<file>`), so every layer but the new head must load. Then, in-process: the
blocks cover the backbone input to output with the head after them; `last_layer`'s cached
probe is solved on `forward_features` and the network then computes exactly the solved
classifier, and the head takes one optimisation step on the cached features; `top_k` and
`full` take one optimisation step on tiny images and move exactly what they train; the ONNX
export matches PyTorch. The default run checks a few families with differently shaped heads;
`-m slow` checks them all.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.utilities.model_summary import summarize
from torch import nn

from finetune import backbones, probe, strategies
from finetune.config.schema import TopKConfig
from finetune.export import export_model
from finetune.heads import affine_parts
from finetune.module import ClassifierModule, countable_example
from finetune.weights import ROOT_LAYER, trace_layers

CLASSES = 3
# (model.name, model.source, image size of the training steps: None = the weights' own size,
# for the families whose input size is fixed)
FAST = [
    ("resnet18", "torchvision", 32),  # one Linear head (fc)
    ("dla46_c", "timm", 32),  # a 1x1 Conv2d classifier
    ("deit_tiny_distilled_patch16_224", "timm", None),  # two heads, cls/dist/pos tokens on root
    ("levit_128s", "timm", None),  # two heads, each a BatchNorm1d + Linear
]
SLOW = [
    ("resnext26ts", "timm", 32),
    ("regnet_x_400mf", "torchvision", 32),
    ("densenet121", "torchvision", 32),
    ("efficientnet_b0", "torchvision", 32),
    ("mobilenet_v2", "torchvision", 32),
    ("mobilenet_v3_small", "torchvision", 32),
    ("convnext_atto", "timm", 32),  # head with its own norm and pooling (head.fc)
    ("vit_tiny_patch16_224", "timm", None),
    ("vit_b_32", "torchvision", None),  # class_token on the root, pos_embedding in encoder
    ("swin_t", "torchvision", 64),
    ("maxvit_pico_rw_256", "timm", None),  # fixed size; head.fc after a norm and pre-logits
    ("mixer_s32_224", "timm", None),
    ("mobilevit_xxs", "timm", 64),
    ("inception_v3", "torchvision", None),  # 299 px, no auxiliary classifier
    ("efficientformer_l1", "timm", None),  # two heads on the same pooled features
    ("pit_ti_distilled_224", "timm", None),  # two heads; the class token passes its pooling
    ("repvit_m0_9", "timm", None),  # two BatchNorm1d + Linear heads inside one module
]


def _own_weights_file(name: str, source: str, folder) -> str:
    """The architecture's own random state dict (original head) saved as a weights file."""
    architecture = backbones.resolve({"name": name, "source": source, "weights": "none"})
    net = architecture.create()
    # BatchNorm statistics of its own activations, as trained weights have: with the initial
    # 0/1 statistics a deep random network's eval-mode activations overflow (Inception-v3).
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.momentum = 1.0
    crop = architecture.input_spec().crop_size
    with torch.no_grad():
        net.train()(torch.randn(4, 3, crop, crop, generator=torch.Generator().manual_seed(1)))
    path = folder / f"{name}.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def _layer_of(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0]


def _one_step(
    network: backbones.Network, inputs: torch.Tensor, labels: torch.Tensor, features: bool = False
) -> set[str]:
    """One SGD step of the network's trainable parameters on images (or, with `features`,
    cached features through `forward_head`); the names of the parameters it moved (a nonzero
    gradient: a small step can leave a weight's float value unchanged)."""
    before = {n: p.detach().clone() for n, p in network.net.named_parameters()}
    trainable = [p for p in network.parameters() if p.requires_grad]
    network.zero_grad()
    logits = network.forward_head(inputs) if features else network(inputs)
    loss = nn.functional.cross_entropy(logits, labels)
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(trainable, lr=1e-3).step()
    frozen = [n for n, p in network.net.named_parameters() if not p.requires_grad]
    assert all(torch.equal(network.net.get_parameter(n), before[n]) for n in frozen)
    return {
        n
        for n, p in network.net.named_parameters()
        if p.grad is not None and bool(p.grad.abs().sum() > 0)
    }


def check_family(name: str, source: str, size: int | None, tmp_path) -> None:
    weights = _own_weights_file(name, source, tmp_path)
    model_cfg = {"name": name, "source": source, "weights": weights}
    network = backbones.build(model_cfg, CLASSES)
    head = network.head_parameter_names()
    head_layers = {_layer_of(n) for n in head}
    head_prefixes = tuple(f"{h}." for h in network.head_names)

    def in_head(layer: str) -> bool:
        return layer in network.head_names or layer.startswith(head_prefixes)

    # Every layer but the new head loads; the new head is the blocker.
    report = network.load_report
    missed = set(report.not_loaded) | {b["layer"] for b in report.blockers}
    assert missed and all(in_head(layer) for layer in missed), report
    assert report.blocker["layer"] in head_layers, report
    assert len(report.loaded) == report.total_layers - len(missed)

    # Blocks: every backbone parameter in exactly one, input to output, the head after them.
    blocks = network.blocks()
    flat = [n for block in blocks for n in block]
    backbone = {n for n, _ in network.net.named_parameters()} - head
    assert len(flat) == len(set(flat)) and set(flat) == backbone and head
    crop = network.input_spec.crop_size
    order, _ = trace_layers(network.net, (torch.zeros(1, 3, crop, crop),))
    position = {layer or ROOT_LAYER: index for index, layer in enumerate(order)}
    first = [min(position[_layer_of(n) or ROOT_LAYER] for n in block) for block in blocks]
    assert first == sorted(first), first
    assert max(position[_layer_of(n) or ROOT_LAYER] for n in flat) < min(
        position[layer] for layer in head_layers
    )
    assert network.blocks(with_head=True) == [*blocks, sorted(head)]  # the head: the last block

    size = size or crop
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2 * CLASSES, 3, size, size, generator=generator)
    labels = torch.arange(2 * CLASSES) % CLASSES

    # last_layer: the probe solved on cached features is the classifier the network computes.
    strategy = strategies.LastLayer()
    strategy.apply(network)
    network.eval()
    with torch.no_grad():
        cached = network.forward_features(images)
    assert cached.shape == (len(images), network.num_features)
    solution = probe.solve(cached, labels, CLASSES, cached, labels, l2_grid=(1e-2,))
    solution.copy_into(network.get_classifier())
    with torch.no_grad():
        solved = cached @ solution.weight.T + solution.bias
        assert torch.allclose(network(images), solved, atol=1e-4, rtol=1e-3)
        assert torch.allclose(network.forward_head(cached), solved, atol=1e-4, rtol=1e-3)
    # The ONNX export of the solved classifier computes what PyTorch does: export_model raises
    # beyond 1e-3 of the largest |logit| (float32 rounding grows with the logits of these
    # random-weight networks).
    exported = export_model(
        network, network.input_spec, ["a", "b", "c"], "onnx", tmp_path / "model.onnx"
    )
    assert exported.max_abs_diff is not None
    module = ClassifierModule(
        ["a", "b", "c"], model_cfg, {}, {}, network=network, inputs_are_features=True
    )
    assert module.example_input_array.shape == (1, network.num_features)
    # The model summary at the start of fit (FLOPs by a forward of the example, as run.py
    # prepares it) does not stop the run.
    module.example_input_array = countable_example(module)
    summarize(module)
    strategy.apply(network.train())  # frozen parts in eval, the head in train mode
    # Labels the solved head gets wrong: its loss has a gradient.
    moved = _one_step(network, cached, (labels + 1) % CLASSES, features=True)
    assert moved and moved <= head

    # As Lightning does at the start of fit: train mode, then the strategy's eval parts.
    strategies.TopK(TopKConfig(k=1)).apply(network.train())
    changed = _one_step(network, images, labels)
    assert changed <= head | set(blocks[-1]) and changed & set(blocks[-1]) and changed & head
    network.zero_grad()
    strategies.Full().apply(network.train())
    changed = _one_step(network, images, labels)
    assert changed & set(blocks[0]) and changed & head


@pytest.mark.parametrize(("name", "source", "size"), FAST)
def test_family_loads_trains_and_exports(name, source, size, tmp_path):
    check_family(name, source, size, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "source", "size"), SLOW)
def test_every_family_of_the_matrix_loads_trains_and_exports(name, source, size, tmp_path):
    check_family(name, source, size, tmp_path)


def test_a_head_built_without_bias_gets_one_and_mnasnet_counts_its_stages():
    """torchvision's maxvit builds its classifier without a bias, which the solved probe has;
    mnasnet names its stages `layers.N`, which top_k and gradual count."""
    config = {"source": "torchvision", "weights": "none", "min_loaded_fraction": None}
    maxvit = backbones.build({**config, "name": "maxvit_t"}, 3, pretrained=False)
    (head,) = maxvit.classifiers()
    assert head.bias is not None and head.out_features == 3
    mnasnet = backbones.build({**config, "name": "mnasnet0_5"}, 3, pretrained=False)
    assert len(mnasnet.blocks()) > 10


def test_a_network_torchs_flop_counter_cannot_trace_gets_its_summary_without_flops():
    """timm's PiT hands a view of its trainable class token to its pooling layers: under
    `no_grad`, torch's FLOP counter raises on it, and Lightning's model summary at the start of
    fit would stop the run. Without the example input the summary lists layers and parameters."""
    config = {"name": "pit_ti_distilled_224", "source": "timm", "weights": "none"}
    network = backbones.build(config, CLASSES, pretrained=False)
    module = ClassifierModule(["a", "b", "c"], config, {}, {}, network=network)
    with pytest.raises(AssertionError, match="gradient function"):
        summarize(module)  # what fit would do with the example
    assert countable_example(module) is None
    module.example_input_array = countable_example(module)
    assert summarize(module).total_parameters > 0
    resnet = backbones.build({**config, "name": "resnet18"}, CLASSES, pretrained=False)
    counted = ClassifierModule(["a", "b", "c"], config, {}, {}, network=resnet)
    assert countable_example(counted) is counted.example_input_array
    assert summarize(counted).total_flops > 0


def test_a_family_without_a_block_table_has_its_root_tensors_in_the_first_block():
    """A network no table knows: each top-level child is a block, input first, and tensors
    registered on the root (a class token) join the first block, where they enter."""
    from timm.models import group_parameters

    from finetune.heads import torchvision_block_matcher

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.stages = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.token = nn.Parameter(torch.zeros(4))
            self.norm = nn.LayerNorm(4)

    net = Tokens()
    groups = group_parameters(net, torchvision_block_matcher("tokens", net))
    blocks = [sorted(names) for _, names in sorted(groups.items())]
    assert blocks == [
        ["embed.bias", "embed.weight", "token"],
        ["stages.0.bias", "stages.0.weight", "stages.1.bias", "stages.1.weight"],
        ["norm.bias", "norm.weight"],
    ]


def test_the_heads_a_classifier_module_averages_are_each_replaced():
    """timm's RepViT keeps its two distilled heads (each a BatchNorm1d + Linear) inside one
    classifier module: each is a head, as a DeiT's two are."""
    config = {"name": "repvit_m0_9", "source": "timm", "weights": "none"}
    network = backbones.build(config, CLASSES, pretrained=False)
    assert network.head_names == ("head.head", "head.head_dist")
    outputs = [affine_parts(head)[1].out_features for head in network.classifiers()]
    assert outputs == [CLASSES, CLASSES]
