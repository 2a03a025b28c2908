"""Preprocessing you can trust.

- Decoding: every consumer (training and evaluation loaders, decode cache, feature cache,
  reports' grid) gets the pixels an image viewer shows, from the one decode function.
- Evaluation: the project's eval tensor equals the weights' library's own eval transform
  (timm's `create_transform`, torchvision's `weights.transforms()`), for every timm crop mode.
- Memory: device crops ship each image at the size its crop needs, so a batch's canvas (and a
  run's peak memory) does not grow with the most elongated image.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SHARED_DATA
from finetune.data import ImageListDataset, load_rgb
from finetune.data.images import DecodedImages
from finetune.input_spec import CROP_MODES, InputSpec
from finetune.transforms import eval_resize, eval_transform

HYMENOPTERA = SHARED_DATA / "hymenoptera_data"
SPEC = InputSpec(32, 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
WHITE = (255, 255, 255)


# --- one decode function, the pixels a viewer shows ---------------------------------------------


def centre_pixel_of_every_consumer(path: Path) -> dict[str, tuple[int, ...]]:
    """The centre pixel of a uniform image as each consumer of images sees it."""
    from finetune.top_losses import top_losses_image

    seen = {"load_rgb": load_rgb(str(path)).getpixel((20, 20))}
    loader = ImageListDataset([(str(path), 0)], eval_transform(SPEC, normalise=False))
    seen["loaders and feature cache"] = tuple(loader[0][0][:, 16, 16].tolist())
    decoded = DecodedImages(budget_mb=1)
    decoded.fill([str(path)], eval_resize(SPEC), threads=1)
    seen["decode cache"] = tuple(decoded.get(str(path))[:, 18, 18].tolist())
    grid = top_losses_image(
        [{"path": str(path), "true": "a", "predicted": "b", "loss": 1.0, "p_true": 0.3}], "title"
    )
    seen["reports grid"] = tuple(grid[28 + 80, 8 + 80].tolist())
    return seen


def adobe_rgb_to_srgb(rgb: tuple[int, int, int]) -> np.ndarray:
    """Adobe RGB (1998) -> sRGB by the published matrices (D65), independent of LittleCMS."""
    to_xyz = np.array(
        [
            [0.5767309, 0.1855540, 0.1881852],
            [0.2973769, 0.6273491, 0.0752741],
            [0.0270343, 0.0706872, 0.9911085],
        ]
    )
    to_srgb = np.array(
        [
            [3.2404542, -1.5371385, -0.4985314],
            [-0.9692660, 1.8760108, 0.0415560],
            [0.0556434, -0.2040259, 1.0572252],
        ]
    )
    linear = np.clip(to_srgb @ to_xyz @ (np.array(rgb) / 255.0) ** (563 / 256), 0, 1)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return encoded * 255


def adobe_rgb_profile() -> bytes:
    """The Adobe RGB (1998) profile embedded in photos of the shared hymenoptera set."""
    if not HYMENOPTERA.is_dir():
        pytest.skip("../shared/data/hymenoptera_data is not present")
    for path in sorted(HYMENOPTERA.glob("*/*/*.jpg")):
        with Image.open(path) as image:
            profile = image.info.get("icc_profile", b"")
        if b"Adobe RGB (1998)" in profile:
            return profile
    pytest.skip("no Adobe RGB photo in the shared hymenoptera set")


def write_case(case: str, path: Path) -> tuple[int, ...]:
    """A 40x40 image file of one type that viewers and naive decoders show differently; returns
    the colour a viewer shows."""
    if case == "sixteen_bit_grey":  # PIL's convert("RGB") clips level 51400 to 255
        Image.fromarray(np.full((40, 40), 51400, dtype=np.uint16)).save(path)
        return (200, 200, 200)
    if case == "transparent_rgba":  # hidden colour red under alpha 0
        Image.new("RGBA", (40, 40), (200, 0, 0, 0)).save(path)
        return WHITE
    if case == "transparent_colour_key":  # PNG tRNS on an RGB image: red is transparent
        Image.new("RGB", (40, 40), (200, 0, 0)).save(path, transparency=(200, 0, 0))
        return WHITE
    if case == "transparent_grey_key":  # PNG tRNS on a greyscale image
        Image.new("L", (40, 40), 60).save(path, transparency=60)
        return WHITE
    if case == "transparent_palette":
        image = Image.new("P", (40, 40), 1)
        image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
        image.save(path, transparency=1)
        return WHITE
    if case == "half_transparent_grey_alpha":  # LA: grey 0 at alpha 128 over white
        Image.new("LA", (40, 40), (0, 128)).save(path)
        return (127, 127, 127)
    if case == "adobe_rgb_profile":  # the same numbers mean other colours in Adobe RGB
        Image.new("RGB", (40, 40), (200, 50, 50)).save(path, icc_profile=adobe_rgb_profile())
        return tuple(int(v) for v in np.round(adobe_rgb_to_srgb((200, 50, 50))))
    if case == "animated_first_frame":  # a viewer shows (and a thumbnail takes) frame one
        frames = [Image.new("RGB", (40, 40), colour) for colour in ((0, 0, 255), (255, 0, 0))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return (0, 0, 255)
    raise AssertionError(case)


CASES = [
    "sixteen_bit_grey",
    "transparent_rgba",
    "transparent_colour_key",
    "transparent_grey_key",
    "transparent_palette",
    "half_transparent_grey_alpha",
    "adobe_rgb_profile",
    "animated_first_frame",
]


@pytest.mark.parametrize("case", CASES)
def test_every_consumer_sees_the_pixels_a_viewer_shows(tmp_path, case, record_fault):
    path = tmp_path / (f"{case}.gif" if case.startswith("animated") else f"{case}.png")
    expected = write_case(case, path)
    seen = centre_pixel_of_every_consumer(path)
    wrong = {
        consumer: pixel
        for consumer, pixel in seen.items()
        if max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) > 1
    }
    record_fault(not wrong)
    assert not wrong, f"a viewer shows {expected}"


def test_adobe_rgb_photo_differs_from_its_raw_numbers(tmp_path):
    """The profile case above can fail: ignoring the profile is off by far more than 1."""
    expected = adobe_rgb_to_srgb((200, 50, 50))
    assert np.abs(expected - np.array((200, 50, 50))).max() > 20


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_turns_the_photo_upright_as_a_viewer_does(tmp_path, orientation):
    """A camera stores the sensor's pixels and an EXIF orientation; viewers rotate. Stored: red
    left half, blue right half (64x32). Orientation 6 (rotate 90 clockwise) shows red on top,
    8 shows blue on top, 3 (180) shows blue left."""
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    shown = load_rgb(str(path))
    red, blue = (255, 0, 0), (0, 0, 255)
    first, second = {3: (blue, red), 6: (red, blue), 8: (blue, red)}[orientation]
    if orientation == 3:
        assert shown.size == (64, 32)
        corners = shown.getpixel((8, 16)), shown.getpixel((56, 16))
    else:
        assert shown.size == (32, 64)
        corners = shown.getpixel((16, 8)), shown.getpixel((16, 56))
    for pixel, colour in zip(corners, (first, second), strict=True):
        assert max(abs(a - b) for a, b in zip(pixel, colour, strict=True)) < 12
    # the loaders see the same upright photo: its top rows are the first colour
    spec = InputSpec(32, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    tensor = ImageListDataset([(str(path), 0)], eval_transform(spec, normalise=False))[0][0]
    assert tensor.shape == (3, 32, 32)
    top = tuple(tensor[:, 2, 16].tolist()) if orientation != 3 else tuple(tensor[:, 16, 2].tolist())
    assert max(abs(a - b) for a, b in zip(top, first, strict=True)) < 12


def test_a_file_left_at_a_later_frame_still_gives_its_first_frame(tmp_path):
    from finetune.data import to_rgb

    path = tmp_path / "two_pages.tif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((10, 20, 30), (200, 0, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as image:
        image.seek(1)
        assert to_rgb(image).getpixel((4, 4)) == (10, 20, 30)


def test_only_the_decode_module_opens_or_converts_images():
    """Every consumer decodes through `finetune.data.images`: no other module of src/ opens an
    image file or converts a decoded image's mode on its own."""
    offenders = []
    for path in sorted((REPO / "src" / "finetune").rglob("*.py")):
        if path.name == "images.py" and path.parent.name == "data":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            if (node.func.attr == "open" and owner in ("Image", "PIL.Image")) or (
                node.func.attr in ("convert", "decode_image", "read_image")
                and owner not in ("self",)
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders


# --- evaluation preprocessing equals the weights' library's own ---------------------------------

# Pretrained configs of every timm crop mode, with several crop_pct, interpolations and sizes.
TIMM_CONFIGS = [
    "resnet50.a1_in1k",  # center, crop_pct 0.95, bicubic
    "efficientnet_b0.ra_in1k",  # center, 0.875
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",  # center, 0.9, mean 0.5
    "convnext_small.fb_in22k_ft_in1k_384",  # squash, 1.0
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


def test_feature_cache_key_changes_with_the_decoder_version(monkeypatch):
    """Features extracted from an older decoding's pixels (before EXIF orientation and colour
    profiles) are not reused."""
    from finetune import backbones, features
    from finetune.data import images

    network = backbones.build(
        {"name": "resnet18", "source": "torchvision", "weights": "none"}, 2, pretrained=False
    )
    fields = features.cache_key_fields(network, eval_transform(SPEC), "32", {})
    monkeypatch.setattr(images, "DECODER_VERSION", images.DECODER_VERSION + 1)
    changed = features.cache_key_fields(network, eval_transform(SPEC), "32", {})
    assert features.cache_key(changed) != features.cache_key(fields)


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


# --- memory grows with the data, not with its worst shape ---------------------------------------


def elongated_folder(root: Path, train_size: tuple[int, int] | None) -> Path:
    """train/: 8 photos, alternately 32x512 and 512x32 (1:16; `train_size=None`) or all of
    `train_size`; val/: small squares (evaluation crops are fixed-size anyway)."""
    generator = np.random.default_rng(0)
    for index in range(8):
        size = train_size or ((32, 512) if index % 2 else (512, 32))
        pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = root / "train" / "ab"[index % 2] / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    for index in range(4):
        path = root / "val" / "ab"[index % 2] / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return root


@pytest.mark.parametrize("decode_cache_mb", [0, 64], ids=["streamed", "cached"])
def test_device_crop_canvas_is_bounded_by_the_crop_not_the_image_shape(
    tmp_path, decode_cache_mb, record_fault
):
    """Before: two 1:16 images made a 4097x4097 canvas (96 MiB for two images). Now each image
    travels as its crop box plus a 1-pixel margin: a crop of a 224-px model spans at most
    4/3 * 256 + 2 pixels a side."""
    from conftest import data_module
    from finetune import backbones
    from finetune.transforms import train_decode_size

    spec = backbones.input_spec({"name": "resnet18", "source": "torchvision", "weights": "DEFAULT"})
    root = elongated_folder(tmp_path / "photos", None)
    options = {"batch_size": 8, "num_workers": 0, "decode_cache_mb": decode_cache_mb}
    module = data_module("imagefolder", root, spec, device_transforms=True, **options)
    module.prepare_data()
    module.setup("fit")
    assert module.crops_on_device
    side = round(train_decode_size(spec) * 4 / 3) + 4
    largest = 0
    for epoch in range(3):
        loader = module.train_dataloader()
        loader.sampler.set_epoch(epoch)
        (canvas, boxes, flips), labels = next(iter(loader))
        largest = max(largest, canvas.nbytes)
        images, _ = module.on_after_batch_transfer(((canvas, boxes, flips), labels), 0)
        assert images.shape == (8, 3, 224, 224)
    record_fault(largest <= 8 * 3 * side * side)
    assert largest <= 8 * 3 * side * side  # 2.8 MB, where it was 8 * 48 MiB


def test_device_crops_of_the_pieces_equal_crops_of_the_whole_images():
    """Shipping the crop's piece changes no crop: the same boxes cut from the whole images give
    the same pixels; sample positions computed in the smaller piece round differently in
    float32 at most by one uint8 step on a few pixels in ten thousand."""
    from torchvision.transforms import RandomResizedCrop

    from finetune.transforms import CropBox, collate_crop_samples, device_crop

    spec = InputSpec(64, 72, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    generator = torch.Generator().manual_seed(0)
    shapes = [(80, 200), (200, 80), (80, 1280), (96, 96), (1280, 80), (90, 130)]
    images = [
        torch.randint(0, 256, (3, *shape), generator=generator).to(torch.uint8) for shape in shapes
    ]
    crop = device_crop(spec, {})
    differing = total = 0
    for scale in [(0.08, 1.0), (0.005, 0.05), (0.9, 1.0)]:
        cropper = CropBox(spec, {"crop_scale": scale}, short_side=80)
        pieces, wholes = [], []
        for index, image in enumerate(images):
            torch.manual_seed(index)
            piece, box, flip = cropper(image)
            pieces.append(((piece, box, flip), 0))
            torch.manual_seed(index)
            top, left, height, width = RandomResizedCrop.get_params(image, scale, [3 / 4, 4 / 3])
            whole = torch.tensor([left, top, left + width, top + height], dtype=torch.float32)
            assert bool(torch.rand(1) < 0.5) == flip
            assert piece.shape[1] <= height + 2 and piece.shape[2] <= width + 2
            wholes.append(((image, whole, flip), 0))
        steps = crop(collate_crop_samples(pieces)[0]) - crop(collate_crop_samples(wholes)[0])
        steps = (steps * 255).abs().round()
        assert steps.max() <= 1
        differing, total = differing + int((steps > 0).sum()), total + steps.numel()
    assert differing <= total * 1e-3


PEAK_MEMORY_RUN = """
import resource, runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as stop:
    if stop.code:
        raise
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(root: Path, run_dir: Path) -> float:
    """Peak resident memory (MB) of a 1-epoch full fine-tuning run on `root`, device crops on."""
    import subprocess
    import sys

    from conftest import folder_overrides, subprocess_env

    overrides = [
        *folder_overrides(root),
        "strategy=full",
        "data.device_transforms=true",
        "data.batch_size=8",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_RUN, *overrides],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split("PEAK_RSS_KB")[-1]) / 1024


@pytest.mark.slow  # four whole runs: CI's slow step
def test_peak_memory_of_a_run_does_not_grow_with_elongated_images(tmp_path, record_fault):
    """Measured on the CPU before the fix: 1:16 photos raised a run's peak by ~1.3 GB (their
    batch canvas, and its float copy for roi_align). Now the run with 8 of them peaks within
    250 MB of the run with 8 square photos of the same pixel count (128x128).

    A run's peak varies by +-50 MB from one process to the next (CI once measured the square
    run 100 MB lower than usual and the difference at 151 MB): each is the lower of two runs,
    and the bound stays below one 1:16 batch canvas as floats (~400 MB)."""
    square_folder = elongated_folder(tmp_path / "square", (128, 128))
    long_folder = elongated_folder(tmp_path / "long", None)
    square = min(peak_rss_mb(square_folder, tmp_path / f"square{i}") for i in range(2))
    elongated = min(peak_rss_mb(long_folder, tmp_path / f"long{i}") for i in range(2))
    print(f"peak RSS: square photos {square:.0f} MB, 1:16 photos {elongated:.0f} MB")
    record_fault(elongated - square < 250)
    assert elongated - square < 250, (square, elongated)


def test_the_input_spec_data_and_transforms_import_no_model_code():
    """Loaders and presets are built from an `InputSpec` alone: importing them loads none of
    the project's network, weight-loading or LightningModule code, and the spec needs no torch."""
    import subprocess
    import sys

    model_code = ["finetune.backbones", "finetune.sources", "finetune.weights", "finetune.module"]
    model_code += ["finetune.weight_files"]
    script = (
        "import sys\n"
        "import finetune.input_spec\n"
        "print('torch' in sys.modules)\n"
        "import finetune.data, finetune.transforms\n"
        f"print(sorted(set({model_code!r}) & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.split("\n")[:2] == ["False", "[]"]
