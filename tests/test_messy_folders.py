"""A user's own folders as they are: symlink loops, byte-identical copies, images above Pillow's
pixel limit."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import data_module, make_class_folders, write_image
from finetune.config import ConfigError, check_command_line
from finetune.data import stratified_split
from finetune.data.duplicates import file_digest
from finetune.data.images import DEFAULT_MAX_IMAGE_PIXELS, allow_pixels, load_rgb
from finetune.errors import DataUnavailableError
from finetune.input_spec import InputSpec
from finetune.predict import collect_inputs

SPEC = InputSpec(
    crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"
)


@pytest.fixture(autouse=True)
def default_pixel_limit():
    """Each test starts and ends at Pillow's default limit (the data module sets it)."""
    allow_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    yield
    allow_pixels(DEFAULT_MAX_IMAGE_PIXELS)


def prepared(root: Path, **options):
    small = {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "decode_cache_mb": 0}
    module = data_module("imagefolder", root, SPEC, **{**small, "val_fraction": 0.25, **options})
    module.prepare_data()
    return module


def test_a_symlink_loop_in_a_class_folder_is_left_out_and_named(tmp_path, caplog):
    pool, photos = tmp_path / "pool", tmp_path / "photos"
    make_class_folders(pool, {"x": 4})
    (photos / "cats").mkdir(parents=True)
    for index, image in enumerate(sorted((pool / "x").iterdir())):  # linked files must work
        os.symlink(image, photos / "cats" / f"cat{index}.jpg")
    make_class_folders(photos, {"dogs": 4}, seed=1)
    os.symlink("..", photos / "dogs" / "everything")  # back to the dataset root
    with caplog.at_level("WARNING"):
        splits = prepared(photos).splits
    every = splits.train + splits.val
    assert Counter(splits.class_names[label] for _, label in every) == {"cats": 4, "dogs": 4}
    assert not [path for path, _ in every if "everything" in path]
    assert "symlink loop" in caplog.text and str(photos / "dogs" / "everything") in caplog.text


def test_byte_identical_copies_stay_on_one_side_of_an_automatic_split(tmp_path, caplog):
    make_class_folders(tmp_path, {"cats": 6, "dogs": 6})
    for image in sorted(tmp_path.rglob("*.jpg")):
        shutil.copy(image, image.with_name(f"{image.stem} (1).jpg"))
    with caplog.at_level("INFO", logger="finetune.data.folders"):
        module = prepared(tmp_path)
    train = {file_digest(path) for path, _ in module.splits.train}
    val = {file_digest(path) for path, _ in module.splits.val}
    assert not train & val
    assert len(module.splits.train) + len(module.splits.val) == 24
    assert module.split_record()["duplicates"] == []
    assert "12 file(s) are byte-identical copies of others" in caplog.text


def test_duplicates_across_given_split_folders_are_named_and_recorded(tmp_path, caplog):
    for split in ("train", "val"):
        make_class_folders(tmp_path / split, {"cats": 3, "dogs": 3}, seed=len(split))
    shutil.copy(tmp_path / "train" / "cats" / "cats_0.jpg", tmp_path / "val" / "cats" / "twin.jpg")
    with caplog.at_level("WARNING"):
        module = prepared(tmp_path)
    assert module.split_record()["duplicates"] == [
        {"train": ["train/cats/cats_0.jpg"], "val": ["val/cats/twin.jpg"]}
    ]
    assert "1 image(s) lie byte-identical in more than one split" in caplog.text
    assert "train:cats_0.jpg = val:twin.jpg" in caplog.text


def test_copies_follow_their_original_and_a_pool_without_copies_splits_as_before():
    samples = [(f"{label}_{i}", label) for label in (0, 1) for i in range(8)]
    plain = stratified_split(samples, 0.25, seed=5)
    assert stratified_split(samples, 0.25, seed=5, copies={}) == plain
    copies = {"0_7": "0_0", "1_7": "1_1"}
    train, val = stratified_split(samples, 0.25, seed=5, copies=copies)
    sides = {path: "train" for path, _ in train} | {path: "val" for path, _ in val}
    assert all(sides[copy] == sides[original] for copy, original in copies.items())
    assert sorted(train + val) == sorted(samples)


def test_an_image_above_the_pixel_limit_is_named_as_too_large_with_the_setting(tmp_path):
    make_class_folders(tmp_path, {"a": 4, "b": 4})
    Image.new("1", (300, 200), 1).save(tmp_path / "a" / "scan.png")  # 60,000 pixels
    with pytest.raises(DataUnavailableError) as refused:
        prepared(tmp_path, max_image_pixels=50_000)
    message = str(refused.value)
    assert "larger than the pixel limit (50000 pixels)" in message
    assert "not corrupt" in message and "data.max_image_pixels=null" in message
    assert "scan.png" in message and "skip_corrupt" not in message
    module = prepared(tmp_path, max_image_pixels=None)  # lifted: the scan trains
    assert sum(1 for path, _ in module.splits.train + module.splits.val if "scan" in path) == 1
    assert module.skipped == {}


def test_a_jpeg_above_pillows_default_limit_decodes_at_a_reduced_size(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    write_image(path, (10, 200, 30), size=400)  # 160,000 pixels
    monkeypatch.setattr("finetune.data.images.DEFAULT_MAX_IMAGE_PIXELS", 50_000)
    allow_pixels(None)
    image = load_rgb(str(path))
    assert image.size == (200, 200)  # halved per side: 40,000 pixels, under the limit
    assert image.getpixel((100, 100)) == pytest.approx((10, 200, 30), abs=3)


def test_predict_inputs_take_gifs_and_name_the_image_types_it_cannot_read(tmp_path, caplog):
    inbox = tmp_path / "inbox"
    write_image(inbox / "a.JPG", (200, 10, 10))
    Image.new("P", (24, 24)).save(inbox / "g.gif")
    (inbox / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    (inbox / "notes.txt").write_text("not an image, not named")
    with caplog.at_level("WARNING"):
        found = collect_inputs(str(inbox), ["cats", "dogs"])
    assert sorted(path.name for path in found.files) == ["a.JPG", "g.gif"]
    assert "Left out 1 file(s) of an image type" in caplog.text
    assert "IMG_0001.HEIC" in caplog.text and "notes.txt" not in caplog.text
    assert load_rgb(str(inbox / "g.gif")).size == (24, 24)


def test_a_data_root_that_holds_datasets_is_refused_naming_the_right_root(tmp_path):
    for dataset in ("ants_bees", "flowers"):
        for split in ("train", "val"):
            make_class_folders(tmp_path / dataset / split, {"a": 2, "b": 2})
    make_class_folders(tmp_path / "tiles", {"crack": 2, "free": 2})  # class folders only
    with pytest.raises(DataUnavailableError) as refused:
        prepared(tmp_path)
    message = str(refused.value)
    assert "The class folder(s) ants_bees, flowers of" in message
    assert f"Fix: data.root={tmp_path / 'ants_bees'}." in message


@pytest.mark.parametrize(
    "override",
    ["model.weights=/runs/a/epoch=9-step=100.ckpt", "data.root=/home/me/My Photos (2024)"],
)
def test_a_path_hydras_grammar_misreads_is_refused_with_its_quoted_form(override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as refused:
        check_command_line(["data=imagefolder", "data.root=photos", override])
    assert f"The override {override} cannot be read" in str(refused.value)
    assert str(refused.value).endswith(f"\"{key}='{value}'\"")
    check_command_line(["data=imagefolder", "data.root=photos", f"{key}='{value}'"])
