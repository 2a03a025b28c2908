"""data=csv: labels from a CSV/TSV file train exactly as the class folders they describe, and a row
that cannot be used is refused naming its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import (
    SHARED_DATA,
    compose_config,
    data_module,
    folder_overrides,
    make_class_folders,
)
from finetune.errors import DataUnavailableError
from finetune.input_spec import InputSpec
from finetune.run import train

SPEC = InputSpec(
    crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"
)


def describe(folder: Path, file: Path, split_column: bool = True, sep: str = ",") -> None:
    """A labels file listing every image of `folder/<split>/<class>/` (relative to the file's
    folder when it is `folder`, else absolute), rows in reverse order: the order must not
    matter."""
    header = ["path", "label", "split"] if split_column else ["path", "label"]
    rows = [sep.join(header)]
    # every file, as a user lists a folder (hymenoptera holds a .gif placeholder)
    images = [p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".csv", ".tsv")]
    for image in sorted(images, reverse=True):
        path = (image.relative_to(folder) if file.parent == folder else image).as_posix()
        rows.append(sep.join([path, image.parent.name, image.parts[-3]][: len(header)]))
    file.write_text("\n".join(rows) + "\n")


def csv_module(root: Path, **labels):
    small = {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "decode_cache_mb": 0}
    spec = {"file": "labels.csv", "path_column": "path", "label_column": "label"}
    module = data_module(
        "csv", root, SPEC, **small, labels={**spec, "split_column": "split", **labels}
    )
    module.prepare_data()
    return module


def test_a_labels_file_trains_exactly_as_the_folders_it_describes(tmp_path, data_root):
    photos = tmp_path / "photos"
    for split, count in (("train", 5), ("val", 3)):
        make_class_folders(photos / split, {"ants": count, "bees": count}, seed=len(split))
    (photos / "train" / "ants" / "placeholder.gif").write_bytes(b"GIF89a")  # left out by both
    describe(photos, photos / "labels.csv")
    folder = folder_overrides(photos)  # data=imagefolder data.root=photos, fast settings
    by_folder = train(compose_config(folder, tmp_path / "by_folder", data_root))
    by_file = train(compose_config(["data=csv", *folder[1:]], tmp_path / "by_file", data_root))
    for key in ("val/acc", "val/loss", "split_sizes", "num_classes"):
        assert by_file[key] == by_folder[key], key


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera_data").is_dir(), reason="no shared data")
def test_a_csv_of_hymenoptera_gives_its_classes_split_and_val_accuracy(make_cfg, tmp_path):
    folder = SHARED_DATA / "hymenoptera_data"
    describe(folder, tmp_path / "labels.csv")
    common = ("model=efficientnet_lite0", "augment=none", "data.num_workers=0")
    by_folder = train(make_cfg("data=imagefolder", f"data.root={folder}", *common, fast=False))
    by_file = train(make_cfg("data=csv", f"data.root={tmp_path}", *common, fast=False))
    assert by_file["split_sizes"] == by_folder["split_sizes"] == {"train": 244, "val": 153}
    assert by_file["val/acc"] == by_folder["val/acc"]


def test_without_a_split_column_val_is_split_off_stratified_and_tsv_is_read(tmp_path):
    make_class_folders(tmp_path / "all", {"cats": 8, "dogs": 4})
    describe(tmp_path / "all", tmp_path / "labels.tsv", split_column=False, sep="\t")
    module = csv_module(tmp_path, file="labels.tsv")
    assert module.class_names == ["cats", "dogs"]
    assert module.splits.sizes() == {"train": 9, "val": 3}
    assert module.split_record()["val_split"].startswith("a stratified share data.val_fraction")


@pytest.mark.parametrize(
    ("row", "named"),
    [
        ("train/cats/cats_0.jpg,,train", "line 2: train/cats/cats_0.jpg: empty label"),
        ("train/cats/cats_0.jpg,cats,holdout", "split 'holdout' is none of train, val, test"),
        ("train/cats/missing.jpg,cats,train", "line 2: train/cats/missing.jpg: no such file"),
        (",cats,train", "line 2: empty path"),
    ],
)
def test_a_row_that_cannot_be_used_is_refused_naming_its_line(tmp_path, row, named):
    for split in ("train", "val"):
        make_class_folders(tmp_path / split, {"cats": 2, "dogs": 2})
    describe(tmp_path, tmp_path / "labels.csv")
    lines = (tmp_path / "labels.csv").read_text().splitlines()
    (tmp_path / "labels.csv").write_text("\n".join([lines[0], row, *lines[1:]]) + "\n")
    with pytest.raises(DataUnavailableError) as refused:
        csv_module(tmp_path)
    assert named in str(refused.value) and "Fix: correct or remove those rows" in str(refused.value)


def test_one_image_with_two_labels_a_missing_file_or_column_is_refused(tmp_path):
    make_class_folders(tmp_path / "train", {"cats": 2, "dogs": 2})
    (tmp_path / "labels.csv").write_text(
        "path,label\ntrain/cats/cats_0.jpg,cats\ntrain/cats/cats_0.jpg,dogs\n"
    )
    with pytest.raises(DataUnavailableError, match="labelled 'dogs', and 'cats' on line 2"):
        csv_module(tmp_path)
    with pytest.raises(DataUnavailableError, match=r"has no column 'file_name'.*path_column="):
        csv_module(tmp_path, path_column="file_name")
    with pytest.raises(DataUnavailableError, match="has no column 'fold'"):
        csv_module(tmp_path, split_column="fold")
    with pytest.raises(DataUnavailableError, match=r"other\.csv does not exist"):
        csv_module(tmp_path, file="other.csv")
