"""Preprocessing you can trust (issue 13, kinds 4, 5 and 7).

- Decoding: every consumer (training and evaluation loaders, decode cache, feature cache,
  reports' grid) gets the pixels an image viewer shows, from the one decode function.
- Evaluation: the project's eval tensor equals the weights' library's own eval transform
  (timm's `create_transform`, torchvision's `weights.transforms()`), for every timm crop mode.
- Memory: device crops ship each image at the size its crop needs, so a batch's canvas (and a
  run's peak memory) does not grow with the most elongated image.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from finetune.backbones import InputSpec
from finetune.data import load_rgb
from finetune.sources import CROP_MODES
from finetune.transforms import eval_transform

HYMENOPTERA = SHARED_DATA / "hymenoptera_data"
SPEC = InputSpec(32, 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
WHITE = (255, 255, 255)


# --- kind 5: evaluation preprocessing equals the weights' library's own -------------------------

# Pretrained configs of every timm crop mode, with several crop_pct, interpolations and sizes.
TIMM_CONFIGS = [
    "resnet50.a1_in1k",  # center, crop_pct 0.95, bicubic
    "efficientnet_b0.ra_in1k",  # center, 0.875
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",  # center, 0.9, mean 0.5
    "convnext_small.fb_in22k_ft_in1k_384",  # squash, 1.0 (the case)
    "coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k",  # squash, mean 0.5
    "deepseek_vit_412m.deepseek_v4_1_flash",  # border, 546 px
]
TORCHVISION_WEIGHTS = [
    ("resnet50", "IMAGENET1K_V2"),  # resize 232, bilinear
    ("efficientnet_b3", "IMAGENET1K_V1"),  # 320 -> 300, bicubic
    ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),  # 384 -> 384, bicubic
    ("swin_v2_t", "IMAGENET1K_V1"),  # 260 -> 256, bicubic
]


def real_photos() -> list[Path]:
    """A landscape and a portrait photo: the crop modes differ most off the square."""
    if not HYMENOPTERA.is_dir():
        pytest.skip("../shared/data/hymenoptera_data is not present")
    photos = {}
    for path in sorted((HYMENOPTERA / "val").glob("*/*.jpg")):
        with Image.open(path) as image:
            photos.setdefault(image.width > image.height, path)
        if len(photos) == 2:
            return list(photos.values())
    raise AssertionError("no landscape and portrait photo in hymenoptera val")


@pytest.mark.parametrize("name", TIMM_CONFIGS)
def test_eval_tensor_equals_timms_own_eval_transform(name, record_fault):
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    from finetune import backbones

    config = resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())
    timms = create_transform(**config, is_training=False)
    spec = backbones.input_spec({"name": name, "source": "timm", "weights": "DEFAULT"})
    assert spec.crop_mode == (config.get("crop_mode") or "center")
    worst = 0.0
    for path in real_photos():
        image = load_rgb(str(path))
        ours, expected = eval_transform(spec)(image), timms(image)
        assert ours.shape == expected.shape
        worst = max(worst, (ours - expected).abs().max().item())
    record_fault(worst <= 1e-5)
    assert worst <= 1e-5


@pytest.mark.parametrize(("name", "weights"), TORCHVISION_WEIGHTS)
def test_eval_tensor_equals_torchvisions_weights_transforms(name, weights):
    import torchvision.models as tvm

    from finetune import backbones

    preset = tvm.get_model_weights(name)[weights].transforms()
    spec = backbones.input_spec({"name": name, "source": "torchvision", "weights": weights})
    for path in real_photos():
        image = load_rgb(str(path))
        torch.testing.assert_close(eval_transform(spec)(image), preset(image), rtol=0, atol=1e-5)


SQUASH = InputSpec(48, 48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", "squash")
BORDER = InputSpec(48, 52, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "border")


@pytest.mark.parametrize("spec", [SQUASH, BORDER], ids=["squash", "border"])
def test_decode_cache_and_device_transforms_keep_the_crop_mode(tmp_path, spec):
    """The eval batch is the same tensor streamed, from the decode cache, and finished on the
    device; a squash keeps the whole photo (its left and right edges), a centre crop does not."""
    from conftest import data_module

    for split in ("train", "val"):
        for index, path in enumerate(real_photos()):
            target = tmp_path / "photos" / split / ("ants" if index else "bees") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    common = {"batch_size": 2, "eval_batch_size": 2, "num_workers": 0}
    batches = {}
    for name, options in {
        "streamed": {"decode_cache_mb": 0},
        "cached": {"decode_cache_mb": 64},
        "device": {"decode_cache_mb": 64, "device_transforms": True},
    }.items():
        module = data_module("imagefolder", tmp_path / "photos", spec, **common, **options)
        module.prepare_data()
        module.setup("fit")
        images, labels = next(iter(module.val_dataloader()))
        batches[name] = module.on_after_batch_transfer((images, labels), 0)[0]
    assert batches["streamed"].shape[-1] == 48
    torch.testing.assert_close(batches["cached"], batches["streamed"], rtol=0, atol=0)
    torch.testing.assert_close(batches["device"], batches["streamed"], rtol=0, atol=1e-6)
    centre = InputSpec(**{**spec.to_dict(), "crop_mode": "center"})
    photo = load_rgb(str(module.splits.val[0][0]))
    assert not torch.allclose(eval_transform(centre)(photo), eval_transform(spec)(photo))


def test_feature_cache_key_changes_with_the_crop_mode():
    from finetune import backbones, features

    network = backbones.build(
        {"name": "resnet18", "source": "torchvision", "weights": "none"}, 2, pretrained=False
    )
    keys = {
        features.cache_key(features.cache_key_fields(network, eval_transform(spec), "32", {}))
        for spec in (InputSpec(**{**SQUASH.to_dict(), "crop_mode": mode}) for mode in CROP_MODES)
    }
    assert len(keys) == 3


def test_unknown_crop_mode_and_non_square_inputs_are_refused_clearly():
    from finetune import backbones
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"crop mode 'stretch'.*center, squash, border"):
        InputSpec(48, 48, (0.5,) * 3, (0.5,) * 3, "bicubic", "stretch")
    with pytest.raises(FinetuneError, match=r"1024x768.*square"):
        backbones.input_spec({"name": "vit_base_patch16_sapiens2.fb", "source": "timm"})
