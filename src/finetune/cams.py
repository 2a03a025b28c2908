"""Where the model looked: class activation maps with pytorch-grad-cam (the `grad-cam` package)
for `python predict.py cam=gradcam` and the evaluation report's top-loss images.

The target layer is the network's last feature block (the last of `Network.blocks()` below the
head: `layer4` of a resnet, the last stage or head convolution of an EfficientNet, the last
encoder block of a vision transformer). A transformer's block outputs tokens `(N, T, C)`: the
reshape transform drops the class (and distillation) tokens and lays the patch tokens out on
their grid `(N, C, h, w)`, as pytorch-grad-cam's ViT example does. Each map is for the
predicted class, scaled to the model's input size and to [0, 1] per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.atomic import atomic_write
from finetune.data import load_rgb
from finetune.embeddings import network_of
from finetune.errors import FinetuneError
from finetune.input_spec import InputSpec

CAMS_FOLDER, HEATMAPS_FILE = "cams", "cams.npy"
# cam=<name> -> the pytorch_grad_cam class; the names are the config's CAM_METHODS
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
}


def is_vision_transformer(network: nn.Module) -> bool:
    """A ViT of timm (`num_prefix_tokens`) or torchvision (`class_token`): its blocks output
    `(N, tokens, C)` and its head reads the class token (or the pooled tokens)."""
    net = getattr(network, "net", network)
    return hasattr(net, "num_prefix_tokens") or hasattr(net, "class_token")


def prefix_tokens(network: nn.Module) -> int | None:
    """The tokens before the patch tokens of a ViT (class, distillation, registers)."""
    net = getattr(network, "net", network)
    if hasattr(net, "num_prefix_tokens"):
        return int(net.num_prefix_tokens)
    return 1 if hasattr(net, "class_token") else None


def target_layer(network: nn.Module) -> nn.Module:
    """The layer whose activations and gradients give the maps: the network's last feature
    block (the last of `network.blocks()` below the head). A convolutional network's is the
    deepest module that holds every parameter of that block (`layer4`), or, when the block
    spans several top-level modules (timm EfficientNet's `blocks.6`, `conv_head`, `bn2`), the
    last of them in the order the network runs them (`bn2`: the final feature map).

    A vision transformer's head reads the class token (or pools the tokens) after the last
    block, so the gradient at the patch tokens of the last block's output is zero; the maps
    use the input of the last block's attention instead, its first LayerNorm (`norm1`, `ln_1`),
    as pytorch-grad-cam's ViT example does."""
    net = network.net
    if is_vision_transformer(network):
        norms = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.LayerNorm)]
        first_of_block = [m for n, m in norms if n.endswith(("norm1", "ln_1", "ln1"))]
        return first_of_block[-1] if first_of_block else norms[-3][1]
    parts = [name.split(".")[:-1] for name in network.blocks()[-1]]  # the owning modules
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    if common and all(len(part) >= len(common) for part in parts):
        return net.get_submodule(".".join(common))
    owners = {part[0] for part in parts if part}
    last = [name for name, _ in net.named_children() if name in owners][-1]
    return net.get_submodule(last)


def tokens_to_grid(prefix_tokens: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reshape transform for a transformer block's `(N, T, C)` output: the first
    `prefix_tokens` (class, distillation, registers; None: whatever precedes the largest
    square number of patch tokens) dropped, the rest as `(N, C, h, w)`. 4-D outputs pass."""

    def reshape(output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 3:
            return output
        tokens = output.shape[1]
        prefix = prefix_tokens if prefix_tokens is not None else tokens - math.isqrt(tokens) ** 2
        side = math.isqrt(tokens - prefix)
        grid = output[:, prefix:].reshape(output.shape[0], side, side, output.shape[2])
        return grid.permute(0, 3, 1, 2)

    return reshape


def heatmaps(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "gradcam",
    layer: nn.Module | None = None,
    targets: Sequence[int] | None = None,
) -> np.ndarray:
    """Class activation maps of a preprocessed batch `(N, 3, H, W)`: float32 `(N, H, W)` in
    [0, 1], for the classes `targets` (None: each image's predicted class), by `method` (a key
    of `METHODS`) at `layer` (None: `target_layer` of the network). Raises `FinetuneError` for
    an unknown method."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        choices = ", ".join(METHODS)
        raise FinetuneError(f"Unknown cam '{method}'. Valid choices: {choices}.")
    network = network_of(model)
    layer = layer if layer is not None else target_layer(network)
    prefix = prefix_tokens(network)
    cam_class = getattr(pytorch_grad_cam, METHODS[method])
    wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    device = next(network.parameters()).device
    # Evaluation and prediction run without autograd; the maps need the gradients at `layer`,
    # which flow only when something before it requires them: the input does.
    with torch.inference_mode(False), torch.enable_grad():
        inputs = images.detach().clone().to(device).requires_grad_(True)
        with cam_class(
            model=network, target_layers=[layer], reshape_transform=tokens_to_grid(prefix)
        ) as cam:
            maps = cam(input_tensor=inputs, targets=wanted)
    return np.nan_to_num(maps.astype(np.float32))


def overlay(image: torch.Tensor, heatmap: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The heatmap `(H, W)` in [0, 1] as a jet colour map blended over the preprocessed
    `image` `(3, H, W)` (its normalisation undone): what the model saw and where it looked.
    `(H, W, 3)` uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.55)


def write_cams(
    model: nn.Module,
    images: torch.Tensor,
    files: Sequence[Path],
    first_row: int,
    folder: Path,
    spec: InputSpec,
    method: str,
) -> np.ndarray:
    """The maps of one batch of predicted images: an overlay PNG per image in `folder`, named
    `<row>_<file stem>.png` (`row`: the image's row of predictions.csv, from `first_row`).
    Returns the `(N, H, W)` maps for cams.npy."""
    maps = heatmaps(model, images, method)
    folder.mkdir(parents=True, exist_ok=True)
    for offset, (image, heatmap, file) in enumerate(zip(images, maps, files, strict=True)):
        picture = Image.fromarray(overlay(image, heatmap, spec))
        target = folder / f"{first_row + offset:05d}_{Path(file).stem}.png"
        atomic_write(target, lambda handle, picture=picture: picture.save(handle, format="PNG"))
    return maps


def write_all_cams(
    model: nn.Module,
    transform: Callable,
    spec: InputSpec,
    files: Sequence[Path],
    output_dir: Path,
    method: str,
    batch_size: int,
) -> Path:
    """`predict.py cam=<method>`: for `files` (the predicted images, in the rows of
    predictions.csv) an overlay PNG each in `output_dir/cams/` and every raw map in
    `output_dir/cams.npy`, float32 `(N, H, W)` in [0, 1] (written atomically). Returns the
    .npy path."""
    maps = []
    for start in range(0, len(files), batch_size):
        chunk = list(files[start : start + batch_size])
        images = torch.stack([transform(load_rgb(str(file))) for file in chunk])
        folder = output_dir / CAMS_FOLDER
        maps.append(write_cams(model, images, chunk, start, folder, spec, method))
    array = np.concatenate(maps) if maps else np.empty((0, 0, 0), np.float32)
    path = output_dir / HEATMAPS_FILE
    atomic_write(path, lambda handle: np.save(handle, array))
    return path
