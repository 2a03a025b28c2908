"""The cached-feature linear probe and the data pipeline's speed switches."""

import logging
import os
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from conftest import FAST_OVERRIDES, SHARED_DATA, TINY_MODEL, data_module, make_class_folders
from finetune import backbones, features
from finetune.backbones import InputSpec
from finetune.data import FinetuneDataModule
from finetune.errors import FinetuneError
from finetune.run import train
from finetune.transforms import (
    collate_crop_samples,
    device_crop,
    device_normalise,
    eval_transform,
    train_decode_size,
)

# The head trained by SGD on cached features (the solved probe is tests/test_probe.py's).
PROBE = ["strategy=last_layer", "augment=none", "trainer.max_epochs=2", "strategy.head_init=random"]


def final_head(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {name: tensor for name, tensor in state.items() if ".classifier." in name}


@pytest.fixture(autouse=True)
def empty_memory_cache():
    features.clear_memory_cache()
    yield
    features.clear_memory_cache()


def test_cached_run_trains_the_same_head_as_the_uncached_run(make_cfg, tmp_path):
    # mobilenet_v2 has a dropout in front of its head: the cached run must draw the same masks.
    common = [*PROBE, "model=mobilenet_v2", "model.weights=none", f"data.cache_dir={tmp_path}/c"]
    cached_cfg = make_cfg(*common)
    cached_cfg.run_dir = str(tmp_path / "cached")
    cached = train(cached_cfg)
    uncached_cfg = make_cfg(*common, "strategy.cache_features=false")
    uncached_cfg.run_dir = str(tmp_path / "uncached")
    uncached = train(uncached_cfg)

    assert cached["feature_cache"] == "miss" and uncached["feature_cache"] == "off"
    # metrics.json has the same keys whatever the strategy (full, lp_ft: none served)
    assert cached["splits_served_as_features"] == ["train", "val"]
    assert uncached["splits_served_as_features"] == []
    cached_head, uncached_head = final_head(tmp_path / "cached"), final_head(tmp_path / "uncached")
    assert cached_head.keys() == uncached_head.keys() and cached_head
    for name, tensor in cached_head.items():
        torch.testing.assert_close(tensor, uncached_head[name], rtol=1e-4, atol=1e-5)
    assert cached["val/acc"] == pytest.approx(uncached["val/acc"])
    assert cached["test/acc"] == pytest.approx(uncached["test/acc"])
    # The checkpoint holds the whole network, not just the head.
    state = torch.load(tmp_path / "cached" / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(state["state_dict"]) > 100


def test_checkpoint_of_a_cached_run_restores_an_image_classifier(make_cfg, tmp_path):
    from finetune.module import load_classifier

    cfg = make_cfg(*PROBE, *TINY_MODEL)
    metrics = train(cfg)
    classifier = load_classifier(metrics["best_checkpoint"])
    assert classifier.inputs_are_features is False
    logits = classifier(torch.zeros(2, 3, 224, 224))
    assert logits.shape == (2, 3)


def test_second_identical_run_reuses_the_cache_from_disk(make_cfg, tmp_path):
    first = train(make_cfg(*PROBE, *TINY_MODEL, f"data.cache_dir={tmp_path}/c"))
    features.clear_memory_cache()  # a new process: only the file remains
    cfg = make_cfg(*PROBE, *TINY_MODEL, f"data.cache_dir={tmp_path}/c")
    cfg.run_dir = str(tmp_path / "second")
    second = train(cfg)
    assert (first["feature_cache"], second["feature_cache"]) == ("miss", "hit")
    assert Path(second["feature_cache_file"]).is_file()
    assert second["val/acc"] == first["val/acc"] and second["val/loss"] == first["val/loss"]


def test_augmentation_turns_the_cache_off_unless_forced(make_cfg, caplog):
    random_head = [*TINY_MODEL, "strategy=last_layer", "strategy.head_init=random"]
    assert train(make_cfg(*random_head))["feature_cache"] == "off"
    with caplog.at_level(logging.WARNING):
        forced = train(make_cfg(*random_head, "strategy.cache_features=true"))
    assert forced["feature_cache"] in ("hit", "miss")
    assert "augmentation is off" in caplog.text


def test_cache_features_with_a_trainable_backbone_is_refused(make_cfg):
    with pytest.raises(FinetuneError, match="strategy=last_layer"):
        train(make_cfg("strategy=full", "+strategy.cache_features=true"))


# --- the cache key: each part changes it, nothing else does ---------------------------------


@pytest.fixture
def key_parts(tmp_path):
    make_class_folders(tmp_path / "imgs", {"a": 3, "b": 3})
    samples = sorted(
        (str(path), int(path.parent.name == "b")) for path in (tmp_path / "imgs").rglob("*.jpg")
    )
    model = {"name": "resnet18", "source": "torchvision", "weights": "none"}
    torch.manual_seed(0)
    backbone = backbones.build(model, 2, pretrained=False)
    spec = backbone.input_spec
    return backbone, spec, {"train": samples[:4], "val": samples[4:]}


def key(backbone, spec, splits, precision="32"):
    return features.cache_key(
        features.cache_key_fields(backbone, eval_transform(spec), precision, splits)
    )


def test_cache_key_is_stable_for_identical_inputs(key_parts):
    backbone, spec, splits = key_parts
    assert key(backbone, spec, splits) == key(backbone, spec, dict(splits))


def test_cache_key_changes_with_the_weights_but_not_the_head(key_parts):
    backbone, spec, splits = key_parts
    before = key(backbone, spec, splits)
    with torch.no_grad():
        backbone.get_classifier().weight.add_(1.0)  # the head is not part of the features
    assert key(backbone, spec, splits) == before
    with torch.no_grad():
        backbone.net.conv1.weight[0, 0, 0, 0] += 1e-3
    assert key(backbone, spec, splits) != before
    backbone.net.bn1.running_mean[0] += 1.0  # buffers change features too
    assert len({before, key(backbone, spec, splits)}) == 2


def test_cache_key_changes_with_the_backbone_name(key_parts):
    backbone, spec, splits = key_parts
    before = key(backbone, spec, splits)
    backbone.name = "resnet18_other"
    assert key(backbone, spec, splits) != before


def test_cache_key_changes_with_the_eval_transform(key_parts):
    backbone, spec, splits = key_parts
    before = key(backbone, spec, splits)
    for change in (
        {"crop_size": spec.crop_size - 8},
        {"resize_size": spec.resize_size + 8},
        {"mean": (0.5, 0.5, 0.5)},
        {"interpolation": "bicubic"},
    ):
        other = InputSpec(**{**spec.to_dict(), **change})
        assert key(backbone, other, splits) != before, change


def test_cache_key_changes_with_the_precision_and_memory_layout(key_parts):
    backbone, spec, splits = key_parts
    assert key(backbone, spec, splits, "32") != key(backbone, spec, splits, "bf16-mixed")
    nhwc = features.cache_key(
        features.cache_key_fields(backbone, eval_transform(spec), "32", splits, True)
    )
    assert nhwc != key(backbone, spec, splits, "32")


def test_cache_key_changes_with_the_file_lists(key_parts):
    backbone, spec, splits = key_parts
    before = key(backbone, spec, splits)
    # a file moved from one split to another, one removed, the order changed
    moved = {"train": splits["train"][:3], "val": splits["train"][3:] + splits["val"]}
    assert key(backbone, spec, moved) != before
    assert key(backbone, spec, {"train": splits["train"][:3], "val": splits["val"]}) != before
    assert key(backbone, spec, {"train": splits["train"][::-1], "val": splits["val"]}) != before
    # a file rewritten in place (new size and modification time)
    path = splits["val"][0][0]
    Path(path).write_bytes(Path(path).read_bytes() + b"\0")
    os.utime(path, ns=(1, 1))
    assert key(backbone, spec, splits) != before


def test_a_changed_image_is_re_extracted_in_the_next_run(make_cfg, tmp_path):
    make_class_folders(tmp_path / "folder", {"cat": 6, "dog": 6})
    fast = [o for o in FAST_OVERRIDES if not o.startswith("data")]
    options = [*fast, *TINY_MODEL, *PROBE, "data=imagefolder", f"data.root={tmp_path}/folder"]
    assert train(make_cfg(*options, fast=False))["feature_cache"] == "miss"
    assert train(make_cfg(*options, fast=False))["feature_cache"] == "hit"
    victim = next((tmp_path / "folder" / "cat").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    os.utime(victim, ns=(10**9, 10**9))
    assert train(make_cfg(*options, fast=False))["feature_cache"] == "miss"


def test_debug_fast_extracts_the_features_of_its_batches_only_and_no_real_run_reads_them(
    make_cfg, tmp_path, caplog
):
    """debug=fast ran two batches, but first extracted the features of every training and
    validation image, and of augmented views of each: on a real dataset, minutes of a smoke
    test. Its features are those of its batches alone, and a real run extracts its own."""
    data = [
        "data.synthetic.train_per_class=40",
        "data.synthetic.val_per_class=8",
        "data.synthetic.test_per_class=8",
        f"data.root={tmp_path / 'data'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = make_cfg(*TINY_MODEL, *data, "debug=fast")  # augment=default: views were auto
    train_batch, eval_batch = cfg.data.batch_size, cfg.data.eval_batch_size  # FAST's 4 and 8
    with caplog.at_level(logging.INFO, logger="finetune"):
        smoke = train(cfg)
    assert smoke["feature_cache"] == "miss"
    assert smoke["feature_rows"] == {"train": 2 * train_batch, "val": 2 * eval_batch}
    assert smoke["probe_augmented_views"] == 0 and "views_cache" not in smoke
    assert smoke["smoke_test_images"] == {"train": 8, "val": 16, "test": 16}
    assert smoke["split_sizes"] == {"train": 120, "val": 24, "test": 24}  # the whole splits
    said = [r.getMessage() for r in caplog.records if "solved on this subset" in r.getMessage()]
    assert len(said) == 1 and "(8 of the 120 training images" in said[0], said

    features.clear_memory_cache()  # a new process: only the cache files remain
    real_cfg = make_cfg(*TINY_MODEL, *data, "augment=none")
    real_cfg.run_dir = str(tmp_path / "real")
    real = train(real_cfg)
    assert real["feature_cache"] == "miss" and "smoke_test_images" not in real
    assert real["feature_rows"] == {"train": 120, "val": 24}
    assert real["feature_cache_file"] != smoke["feature_cache_file"]


def test_unreadable_cache_file_is_recomputed(make_cfg, tmp_path):
    first = train(make_cfg(*PROBE, *TINY_MODEL, f"data.cache_dir={tmp_path}/c"))
    Path(first["feature_cache_file"]).write_bytes(b"truncated")
    features.clear_memory_cache()
    again = train(make_cfg(*PROBE, *TINY_MODEL, f"data.cache_dir={tmp_path}/c"))
    assert again["feature_cache"] == "miss" and again["val/acc"] == first["val/acc"]


# --- decode cache and device transforms --------------------------------------------------------

HYMENOPTERA = SHARED_DATA / "hymenoptera_data"


def hymenoptera_module(**options) -> FinetuneDataModule:
    if not HYMENOPTERA.is_dir():
        pytest.skip("../shared/data/hymenoptera_data is not present")
    spec = backbones.input_spec({"name": "resnet18", "source": "torchvision", "weights": "DEFAULT"})
    options = {"batch_size": 8, "num_workers": 0, **options}
    module = data_module("hymenoptera", SHARED_DATA, spec, **options)
    module.setup("fit")
    return module


@pytest.mark.parametrize("budget_mb", [512, 3])
def test_decode_cache_gives_the_streaming_eval_pixels(budget_mb):
    streaming = hymenoptera_module(decode_cache_mb=0)
    cached = hymenoptera_module(decode_cache_mb=budget_mb)
    assert streaming.decoded is None and cached.decoded is not None
    if budget_mb == 3:  # a small budget caches some images and streams the rest
        assert len(cached.decoded.images) > 0 and cached.decoded.streamed > 0
    else:
        assert cached.decoded.streamed == 0
    for index in range(0, len(streaming.datasets["val"]), 10):
        expected, label = streaming.datasets["val"][index]
        actual, cached_label = cached.datasets["val"][index]
        assert label == cached_label
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_decode_cache_feeds_augmented_training_crops():
    cached = hymenoptera_module(decode_cache_mb=512, augment={"auto_augment": "trivialaugment"})
    images, _labels = next(iter(cached.train_dataloader()))
    assert images.shape == (8, 3, 224, 224) and images.dtype == torch.float32
    assert len(cached.decoded.images) == sum(cached.splits.sizes().values())


def test_device_transforms_normalise_after_the_transfer_like_the_loader_would():
    on_cpu = hymenoptera_module(decode_cache_mb=0)
    on_device = hymenoptera_module(decode_cache_mb=0, device_transforms=True)
    expected, labels = next(iter(on_cpu.val_dataloader()))
    uint8_batch, same_labels = next(iter(on_device.val_dataloader()))
    assert uint8_batch.dtype == torch.uint8
    actual, _ = on_device.on_after_batch_transfer((uint8_batch, same_labels), 0)
    torch.testing.assert_close(actual, expected)
    assert torch.equal(labels, same_labels)


# crop 16 of a resize to 18; mean = std = 0.5, so one uint8 step is 2/255 after normalising
SMALL_SPEC = InputSpec(16, 18, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


def test_device_crop_of_a_crop_sized_box_is_the_exact_slice_flipped_or_not():
    generator = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=generator)
    tall = torch.randint(0, 256, (3, 24, 18), dtype=torch.uint8, generator=generator)
    samples = [
        ((wide, torch.tensor([5.0, 2.0, 21.0, 18.0]), False), 0),
        ((tall, torch.tensor([2.0, 8.0, 18.0, 24.0]), True), 1),  # to the bottom-right corner
    ]
    batch, labels = collate_crop_samples(samples)
    assert batch[0].shape == (2, 3, 25, 31) and labels.tolist() == [0, 1]
    expected = torch.stack([wide[:, 2:18, 5:21], tall[:, 8:24, 2:18].flip(-1)])
    normalise = device_normalise(SMALL_SPEC, {})
    actual = device_crop(SMALL_SPEC, {})(batch)
    torch.testing.assert_close(actual, normalise(expected), rtol=0, atol=0)


@pytest.mark.parametrize("box_side", [32, 21, 12], ids=["shrink_2x", "shrink_1.3x", "enlarge"])
def test_device_crop_resizes_like_torchvision_up_to_the_image_edge(box_side):
    """A box at the image's right and bottom edge, in a canvas padded for a larger image: the
    crop equals torchvision's antialiased resize of the same pixels within two uint8 steps,
    with no padding leaking into the last row and column (it would darken them by 20+)."""
    rows, columns = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    smooth = 150 + 40 * torch.sin(rows / 7) * torch.cos(columns / 9)
    image = smooth.round().to(torch.uint8).expand(3, -1, -1).clone()
    left, top = 60 - box_side, 40 - box_side
    samples = [
        ((image, torch.tensor([left, top, 60.0, 40.0]), False), 0),
        (
            (
                torch.zeros(3, 50, 80, dtype=torch.uint8),
                torch.tensor([0.0, 0.0, 32.0, 32.0]),
                False,
            ),
            1,
        ),
    ]
    batch, _ = collate_crop_samples(samples)
    cropped = device_crop(SMALL_SPEC, {})(batch)[0]
    resized = F.resize(image[:, top:, left:], [16, 16], antialias=True)
    expected = device_normalise(SMALL_SPEC, {})(resized[None])[0]
    uint8_steps = (cropped - expected).abs() * 255 * 0.5  # std 0.5
    assert uint8_steps.max() <= 2.001


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_crop_on_cuda_matches_the_cpu():
    generator = torch.Generator().manual_seed(0)
    samples = [
        ((torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=generator), box, flip), 0)
        for box, flip in [
            (torch.tensor([3.0, 5.0, 40.0, 37.0]), True),
            (torch.tensor([50.0, 30.0, 60.0, 40.0]), False),
        ]
    ]
    batch, _ = collate_crop_samples(samples)
    on_cpu = device_crop(SMALL_SPEC, {})(batch)
    on_cuda = device_crop(SMALL_SPEC, {})(tuple(part.cuda() for part in batch))
    assert (on_cuda.cpu() - on_cpu).abs().max() <= 2 / 255 / 0.5 + 1e-6  # one uint8 step


@pytest.mark.parametrize(
    "decode_cache_mb,num_workers", [(512, 2), (0, 0)], ids=["cached_in_workers", "streamed"]
)
def test_device_crops_are_seeded_per_image_and_epoch(decode_cache_mb, num_workers):
    """The loader ships whole images with boxes, the same ones for the same epoch (a resumed
    run crops as the uninterrupted one), other ones the next epoch; the device makes crops."""
    module = hymenoptera_module(
        decode_cache_mb=decode_cache_mb, device_transforms=True, num_workers=num_workers
    )
    assert module.crops_on_device

    def first_batch():
        (canvas, boxes, flips), labels = next(iter(module.train_dataloader()))
        side = train_decode_size(module.input_spec)  # pieces of crops: about 4/3 of it
        assert canvas.dtype == torch.uint8 and max(canvas.shape[-2:]) <= round(side * 4 / 3) + 4
        images, _ = module.on_after_batch_transfer(((canvas, boxes, flips), labels), 0)
        assert images.shape == (8, 3, 224, 224) and images.dtype == torch.float32
        return boxes, images

    boxes, images = first_batch()
    again_boxes, again_images = first_batch()
    assert torch.equal(boxes, again_boxes) and torch.equal(images, again_images)
    loader = module.train_dataloader()
    loader.sampler.set_epoch(1)
    (_, next_epoch_boxes, _), _ = next(iter(loader))
    assert not torch.equal(boxes, next_epoch_boxes)


@pytest.mark.parametrize(
    "options",
    [
        {"device_transforms": True, "augment": {"color_jitter": 0.4}},  # per-image colours
        {"device_transforms": "normalise"},  # asked for
    ],
    ids=["colour_jitter", "normalise_only"],
)
def test_crops_stay_in_the_loader_workers_when_they_must_or_are_asked_to(options):
    module = hymenoptera_module(decode_cache_mb=0, **options)
    assert module.device_transforms and not module.crops_on_device
    uint8_batch, labels = next(iter(module.train_dataloader()))
    assert uint8_batch.dtype == torch.uint8 and uint8_batch.shape == (8, 3, 224, 224)
    images, _ = module.on_after_batch_transfer((uint8_batch, labels), 0)
    assert images.dtype == torch.float32 and images.shape == (8, 3, 224, 224)


def test_run_with_decode_cache_channels_last_and_device_transforms(make_cfg):
    metrics = train(
        make_cfg(
            *TINY_MODEL,
            "strategy=full",
            "data.decode_cache_mb=64",
            "data.device_transforms=true",
            "speed.channels_last=true",
        )
    )
    assert metrics["feature_cache"] == "off" and 0.0 <= metrics["val/acc"] <= 1.0
    assert metrics["trainable_params"] == metrics["total_params"]


@pytest.mark.slow  # inductor compiles C++ kernels: minutes on a 2-core CPU
def test_compile_switch_trains_the_compiled_network(make_cfg):
    metrics = train(
        make_cfg("strategy=full", "speed.compile=true", "model=resnet18", "model.weights=none")
    )
    assert metrics["feature_cache"] == "off" and 0.0 <= metrics["val/acc"] <= 1.0


def test_feature_batches_pass_the_device_finishing_untouched():
    # The solved probe's run serves train and val as cached features and test as images: on a
    # GPU the image batches are finished on the device, the feature batches must not be.
    module = hymenoptera_module(decode_cache_mb=0, device_transforms=True, num_workers=0)
    assert module.crops_on_device
    features_batch = (torch.randn(5, 7), torch.arange(5))
    assert module.on_after_batch_transfer(features_batch, 0)[0] is features_batch[0]
