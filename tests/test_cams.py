"""Class activation maps (pytorch-grad-cam): most of a map's mass on the shape that decides
the class, the target layer of each family, predict.py cam=..., and the report's overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from conftest import read_csv, real_photos, run_entry
from finetune import backbones
from finetune.cams import METHODS, heatmaps, target_layer, tokens_to_grid
from finetune.config.commands import CAM_METHODS

SIZE = 64


class RedShapeNet(nn.Module):
    """A hand-set classifier: channel 0 of `detector` is the red excess of each pixel (the
    shape, drawn red on grey), channel 1 the grey background; class 1 ("a red shape") is 10
    times the shape's mean activation, class 0 a constant 0.2 (below it with any shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.detector = nn.Conv2d(3, 2, kernel_size=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.detector.weight.copy_(
                torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 0.0]])[..., None, None]
            )
            self.detector.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.2, 0.0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.detector(images))).flatten(1))


def shape_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` grey images with a red square or disc at a random known place, and its mask."""
    generator = torch.Generator().manual_seed(0)
    images = torch.full((count, 3, SIZE, SIZE), 0.4)
    masks = torch.zeros(count, SIZE, SIZE, dtype=torch.bool)
    rows, columns = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for index in range(count):
        top, left = torch.randint(4, SIZE - 24, (2,), generator=generator).tolist()
        side = 16
        if index % 2:  # a disc
            centre_y, centre_x = top + side / 2, left + side / 2
            mask = (rows - centre_y) ** 2 + (columns - centre_x) ** 2 <= (side / 2) ** 2
        else:  # a square
            mask = (rows >= top) & (rows < top + side) & (columns >= left) & (columns < left + side)
        masks[index] = mask
        images[index, 0][mask], images[index, 1][mask], images[index, 2][mask] = 0.9, 0.1, 0.1
    return images, masks


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_most_of_the_map_lies_inside_the_shape_that_decides_the_class(method):
    model = RedShapeNet().eval()
    images, masks = shape_images(6)
    with torch.inference_mode():  # as prediction and evaluation run
        assert (model(images).argmax(dim=1) == 1).all()
        maps = heatmaps(model, images, method, layer=model.act)
    assert maps.shape == (6, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    for heatmap, mask in zip(maps, masks.numpy(), strict=True):
        inside = heatmap[mask].sum() / heatmap.sum()
        assert inside > 0.8, (method, inside)  # the shape is a sixteenth of the image


def test_the_target_layer_is_the_last_feature_block_of_each_family():
    cases = {
        ("resnet18", "torchvision"): "layer4",
        ("efficientnet_lite0", "efficientnet_lite"): "bn2",
        ("test_vit", "timm"): "blocks.5.norm1",
    }
    for (name, source), expected in cases.items():
        network = backbones.build(
            {"name": name, "source": source, "weights": "none"}, 2, pretrained=False
        ).eval()
        layer = target_layer(network)
        assert [n for n, m in network.net.named_modules() if m is layer] == [expected]
        crop = network.input_spec.crop_size
        maps = heatmaps(network, torch.randn(2, 3, crop, crop), "gradcam")
        assert maps.shape == (2, crop, crop) and np.isfinite(maps).all()
        assert maps.max() > 0  # the gradients reached the layer (not a ViT's dead tokens)
    assert tuple(METHODS) == CAM_METHODS  # every method the config accepts is served


def test_a_transformers_tokens_become_its_patch_grid_without_the_class_token():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)  # 1 + 4 x 4 tokens
    grid = tokens_to_grid(1)(tokens)
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])
    distilled = torch.randn(1, 2 + 196, 8)  # class and distillation tokens, 14 x 14 patches
    assert tokens_to_grid(None)(distilled).shape == (1, 8, 14, 14)
    feature_map = torch.randn(1, 8, 7, 7)
    assert tokens_to_grid(1)(feature_map) is feature_map


def test_predict_writes_an_overlay_per_image_and_the_maps(lite0_run, tmp_path):
    photos = real_photos(tmp_path / "photos", per_class=2, class_folders=False)
    out = tmp_path / "out"
    result = run_entry(
        "predict.py",
        f"ckpt={lite0_run}",
        f"inputs={tmp_path / 'photos'}",
        "cam=gradcam++",
        "batch_size=3",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "predictions.csv")
    maps = np.load(out / "cams.npy")
    assert maps.shape == (len(photos), 224, 224) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.max(axis=(1, 2)) > 0.99).all()
    overlays = sorted((out / "cams").glob("*.png"))
    expected = [f"{index:05d}_{Path(row['path']).stem}.png" for index, row in enumerate(rows)]
    assert [p.name for p in overlays] == expected
    with Image.open(overlays[0]) as first:
        assert first.size == (224, 224) and first.mode == "RGB"


def test_the_report_shows_the_top_losses_where_the_model_looked(lite0_run):
    events = EventAccumulator(str(lite0_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "val/top_losses_cam" in events.Tags()["images"]
    assert "No class activation maps" not in (lite0_run / "train.log").read_text()
