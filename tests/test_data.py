import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, data_module, make_class_folders
from finetune.backbones import InputSpec
from finetune.data import FinetuneDataModule, stratified_split
from finetune.errors import DataUnavailableError, FinetuneError
from finetune.transforms import eval_transform, train_transform

SPEC = InputSpec(
    crop_size=32,
    resize_size=36,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    interpolation="bilinear",
)


def datamodule(dataset: str, root: Path, prepare: bool = True, **options) -> FinetuneDataModule:
    small = {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "decode_cache_mb": 0}
    module = data_module(dataset, root, SPEC, **{**small, **options})
    if prepare:
        module.prepare_data()
    return module


def first_batch(dm: FinetuneDataModule, loader: str = "train_dataloader"):
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(getattr(dm, loader)()))


def test_imagefolder_with_train_val_test_subfolders(tmp_path):
    for split, count in (("train", 5), ("val", 2), ("test", 3)):
        make_class_folders(tmp_path / split, {"cat": count, "dog": count}, seed=len(split))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    dm = datamodule("imagefolder", tmp_path)
    assert dm.class_names == ["cat", "dog"]
    assert dm.splits.sizes() == {"train": 10, "val": 4, "test": 6}
    images, labels = first_batch(dm)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert set(labels.tolist()) <= {0, 1}


def test_imagefolder_of_class_folders_is_split_stratified_and_seeded(tmp_path):
    make_class_folders(tmp_path, {"a": 20, "b": 10, "c": 5})
    dm = datamodule("imagefolder", tmp_path, val_fraction=0.2, split_seed=3)
    splits = dm.splits
    assert splits.test is None
    assert Counter(label for _, label in splits.val) == {0: 4, 1: 2, 2: 1}
    assert Counter(label for _, label in splits.train) == {0: 16, 1: 8, 2: 4}
    assert not {p for p, _ in splits.val} & {p for p, _ in splits.train}
    again = datamodule("imagefolder", tmp_path, val_fraction=0.2, split_seed=3).splits
    other_seed = datamodule("imagefolder", tmp_path, val_fraction=0.2, split_seed=4).splits
    assert again.val == splits.val
    assert other_seed.val != splits.val


def test_stratified_split_keeps_one_of_each_class_in_val():
    samples = [(f"{label}_{i}", label) for label, n in ((0, 3), (1, 2)) for i in range(n)]
    train, val = stratified_split(samples, 0.1, seed=0)
    assert sorted(label for _, label in val) == [0, 1]
    assert len(train) == 3


def test_flowers102_uses_the_official_splits(flowers_root):
    dm = datamodule("flowers102", flowers_root, download=False)
    assert dm.splits.sizes() == {"train": 1020, "val": 1020, "test": 6149}
    assert dm.num_classes == 102 and len(set(dm.class_names)) == 102
    assert Counter(label for _, label in dm.splits.train) == {label: 10 for label in range(102)}
    images, labels = first_batch(dm, "test_dataloader")
    assert images.shape == (4, 3, 32, 32)
    assert labels.max() < 102


def test_flowers102_without_its_held_out_test_images_has_no_test_split(flowers_root):
    # The shared copy holds train and val only: the official test images are held out.
    jpg = flowers_root / "flowers-102" / "jpg"
    test_ids = {Path(p).name for p, _ in datamodule("flowers102", flowers_root).splits.test}
    for name in test_ids:
        (jpg / name).unlink()
    dm = datamodule("flowers102", flowers_root, download=False)
    assert dm.splits.sizes() == {"train": 1020, "val": 1020}
    assert not dm.has_test_split


def test_flowers102_with_some_images_missing_names_the_split(flowers_root):
    dm = datamodule("flowers102", flowers_root)
    for path, _ in dm.splits.val[:3]:
        Path(path).unlink()
    with pytest.raises(DataUnavailableError, match="3 of the 1020 Flowers102 val images"):
        datamodule("flowers102", flowers_root, download=False)


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera_data").is_dir(), reason="no shared hymenoptera")
def test_real_hymenoptera_set_loads_without_the_gif_placeholder():
    dm = datamodule("hymenoptera", SHARED_DATA, download=False)
    assert dm.class_names == ["ants", "bees"]
    assert dm.splits.sizes() == {"train": 244, "val": 153}
    assert not any(path.endswith(".gif") for path, _ in dm.splits.train)
    assert not dm.has_test_split
    images, _ = first_batch(dm, "val_dataloader")
    assert images.shape == (4, 3, 32, 32)


def test_synthetic_set_is_generated_once_and_regenerated_when_its_recipe_changes(tmp_path):
    recipe = {
        "train_per_class": 3,
        "val_per_class": 2,
        "test_per_class": 1,
        "image_size": 24,
        "seed": 0,
    }
    dm = datamodule("synthetic", tmp_path, synthetic=recipe)
    assert dm.class_names == ["circle", "square", "stripes"]
    assert dm.splits.sizes() == {"train": 9, "val": 6, "test": 3}
    marker = tmp_path / "synthetic" / "recipe.json"
    first_mtime = marker.stat().st_mtime_ns
    assert datamodule("synthetic", tmp_path, synthetic=recipe).splits.sizes()["train"] == 9
    assert marker.stat().st_mtime_ns == first_mtime  # reused, not regenerated
    bigger = datamodule("synthetic", tmp_path, synthetic={**recipe, "train_per_class": 5})
    assert bigger.splits.sizes()["train"] == 15
    assert json.loads(marker.read_text())["train_per_class"] == 5


def test_missing_dataset_without_network_names_the_folder_and_the_fix(tmp_path):
    dm = datamodule(
        "hymenoptera", tmp_path / "nowhere", prepare=False
    )  # download=True: the download fails here
    with pytest.raises(DataUnavailableError) as caught:
        dm.prepare_data()
    message = str(caught.value)
    assert str(tmp_path / "nowhere" / "hymenoptera_data") in message
    assert "data.root" in message
    assert not (tmp_path / "nowhere" / "hymenoptera_data.zip").exists()


def test_missing_imagefolder_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataUnavailableError, match="does not exist"):
        datamodule("imagefolder", tmp_path / "photos", prepare=False).prepare_data()


@pytest.mark.parametrize("layout", ["train_val", "class_folders", "one_set_of_classes"])
def test_a_single_class_folder_is_refused_and_a_root_one_level_too_high_named(tmp_path, layout):
    photos = tmp_path / "photos"
    if layout == "one_set_of_classes":  # root/photos/mydata/{ants,bees}: an unzipped folder
        make_class_folders(photos / "mydata", {"ants": 3, "bees": 3})
    else:
        for split in ("train", "val"):
            make_class_folders(photos / "mydata" / split, {"ants": 3, "bees": 3})
    root = tmp_path / "nested" if layout == "train_val" else photos
    if layout == "train_val":  # root/train holds one class folder: mydata
        make_class_folders(root / "train" / "mydata", {"ants": 3})
        make_class_folders(root / "val" / "mydata", {"ants": 3})
    with pytest.raises(DataUnavailableError, match="Only one class folder") as caught:
        datamodule("imagefolder", root, prepare=False).prepare_data()
    message = str(caught.value)
    if layout == "class_folders":
        assert f"Fix: data.root={photos / 'mydata'} (it holds train/ and val/)" in message
    elif layout == "one_set_of_classes":
        assert "one level too high" in message
        assert f"Fix: data.root={photos / 'mydata'}." in message
        assert "add a sub-folder" not in message
    else:
        assert "Fix: add a sub-folder of images for each other class" in message


def test_folders_of_class_folders_as_classes_are_named_with_the_root_one_level_down(
    tmp_path, caplog
):
    nest = tmp_path / "nest"
    for name in ("setA", "setB"):
        make_class_folders(nest / name, {"ants": 3, "bees": 3})
    with caplog.at_level("WARNING", logger="finetune.data.folders"):
        datamodule("imagefolder", nest, prepare=False).prepare_data()
    assert "look like sets of classes" in caplog.text
    assert f"data.root={nest / 'setA'}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune.data.folders"):  # ordinary classes
        datamodule("imagefolder", nest / "setA", prepare=False).prepare_data()
    assert "sets of classes" not in caplog.text


def test_what_a_folder_scan_leaves_out_is_named(tmp_path, caplog):
    photos = tmp_path / "photos"
    make_class_folders(photos, {"ants": 6, "bees": 6, "wasps": 1})
    make_class_folders(tmp_path / "loose", {"x": 1})
    (tmp_path / "loose" / "x" / "x_0.jpg").rename(photos / "loose1.jpg")  # beside the classes
    (photos / "ants" / "pal.gif").write_bytes(b"GIF89a")
    with caplog.at_level("WARNING", logger="finetune.data.layouts"):
        dm = datamodule("imagefolder", photos, prepare=False)
        dm.prepare_data()
    warned = caplog.text
    assert f"1 image(s) directly in {photos} belong to no class folder" in warned
    assert "loose1.jpg" in warned
    assert "Left out 1 file(s) of an image type the loader does not read" in warned
    assert "ants/pal.gif" in warned
    assert "Class(es) wasps have too few images to keep one for val" in warned
    assert dm.splits.sizes()["train"] + dm.splits.sizes()["val"] == 13  # as before: left out


@pytest.mark.parametrize("dataset", ["flowers102", "hymenoptera"])
def test_a_dataset_absent_offline_is_a_clear_error_naming_the_documented_key(tmp_path, dataset):
    with pytest.raises(DataUnavailableError) as caught:
        datamodule(dataset, tmp_path, prepare=False, download=False).prepare_data()
    folder = {"flowers102": "flowers-102", "hymenoptera": "hymenoptera_data"}[dataset]
    # the README sets the datasets' folder with paths.data_root
    assert f"point paths.data_root (or data.root) at the folder that contains {folder}/" in str(
        caught.value
    )


def test_eval_preset_resizes_crops_and_normalises_with_the_spec():
    from PIL import Image

    image = Image.new("RGB", (80, 40), (128, 255, 0))
    tensor = eval_transform(SPEC)(image)
    assert tensor.shape == (3, 32, 32)
    expected = torch.tensor([(128 / 255 - 0.5) / 0.25, (1 - 0.5) / 0.25, (0 - 0.5) / 0.25])
    assert torch.allclose(tensor[:, 16, 16], expected, atol=1e-2)


def test_augment_none_trains_on_exactly_the_eval_preprocessing():
    from PIL import Image

    image = Image.effect_noise((50, 70), 40).convert("RGB")
    none = {
        "random_resized_crop": False,
        "hflip": False,
        "color_jitter": 0,
        "auto_augment": "none",
        "random_erasing": 0,
    }
    assert torch.equal(train_transform(SPEC, none)(image), eval_transform(SPEC)(image))
    strong = {"auto_augment": "trivialaugment", "random_erasing": 0.5, "color_jitter": 0.3}
    assert train_transform(SPEC, strong)(image).shape == (3, 32, 32)


def test_epoch_sampler_reshuffles_every_epoch_and_follows_set_epoch():
    from finetune.data import EpochSampler

    sampler = EpochSampler(20, seed=3)
    sampler.set_epoch(4)
    fourth = list(sampler)
    assert {epoch for epoch, _ in fourth} == {4} and sorted(i for _, i in fourth) == list(range(20))
    fifth = list(sampler)  # no set_epoch (a wrapping distributed sampler): the next epoch
    assert {epoch for epoch, _ in fifth} == {5} and fifth != fourth
    sampler.set_epoch(4)
    assert list(sampler) == fourth  # the same epoch, the same order: what a resume needs


def test_nothing_is_generated_or_listed_before_prepare_data(tmp_path):
    recipe = {"train_per_class": 2, "val_per_class": 1, "test_per_class": 1, "seed": 0}
    dm = datamodule("synthetic", tmp_path, prepare=False, synthetic={"image_size": 16, **recipe})
    with pytest.raises(FinetuneError, match=r"prepare_data\(\)"):
        dm.class_names  # noqa: B018 - reading must not download or generate
    assert not (tmp_path / "synthetic").exists()
    dm.prepare_data()
    assert dm.splits.sizes() == {"train": 6, "val": 3, "test": 3}
    assert any((dm.cache_dir / "verified").iterdir())  # every image was decoded once
    assert not (tmp_path / ".cache").exists()  # in the project's cache folder, not the data's


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"device_transforms": "gpu"}, r"`data.device_transforms=gpu` is not one of: auto, norm"),
        ({"train_fraction": 0}, r"`data.train_fraction=0` must be above 0"),
        ({"train_fraction": 1.5}, r"`data.train_fraction=1.5` is above its maximum 1"),
        ({"batch_size": 0}, r"`data.batch_size=0` is below its minimum 1"),
    ],
)
def test_a_data_module_built_in_code_refuses_what_the_schema_does(tmp_path, option, message):
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        data_module("imagefolder", tmp_path, SPEC, **option)


def test_constructor_defaults_do_not_disagree_with_the_config(make_cfg):
    import inspect

    parameters = inspect.signature(FinetuneDataModule).parameters
    for key, value in make_cfg("data=hymenoptera", fast=False).data.items():
        default = parameters[key].default
        assert default is inspect.Parameter.empty or default == value, key


def test_the_report_grid_decodes_like_training(tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.top_losses import top_losses_image

    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((40, 40), 51400, dtype=np.uint16)).save(path)  # PIL alone: 255
    grid = top_losses_image(
        [{"path": str(path), "true": "a", "predicted": "b", "loss": 1.0, "p_true": 0.3}], "title"
    )
    assert tuple(grid[28 + 80, 8 + 80]) == (200, 200, 200)
