"""A run leaves the user's folders alone and says what it did: the split it
made is in the run dir, caches go to the project's cache folder, a failed download leaves no
empty data root behind, and `data.root=~/photos` works as typed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TINY_MODEL, folder_overrides, make_class_folders, run_train, subprocess_env
from finetune.errors import DataUnavailableError
from finetune.run import train

COUNTS = {"cat": 10, "dog": 6, "owl": 5}


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` (itself included): size and modification time."""
    state = {}
    for directory, subdirs, files in os.walk(folder):
        for name in [".", *subdirs, *files]:
            path = Path(directory) / name
            stat = path.stat()
            state[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return state


def photo_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.jpg")}


def check_split(run_dir: Path, photos: Path, val_fraction: float) -> dict:
    """split.json holds every photo once, in train or val, with the val share of each class."""
    record = json.loads((run_dir / "split.json").read_text())
    files = record["files"]
    train_files = {p for paths in files["train"].values() for p in paths}
    val_files = {p for paths in files["val"].values() for p in paths}
    assert train_files | val_files == photo_files(photos)
    assert not train_files & val_files
    for name, count in COUNTS.items():
        assert all(p.startswith(f"{name}/") for p in files["val"][name] + files["train"][name])
        assert len(files["val"][name]) == max(1, round(count * val_fraction)), name
    assert f"data.val_fraction={val_fraction}" in record["val_split"]
    assert record["sizes"] == {"train": len(train_files), "val": len(val_files)}
    return record


def test_a_run_records_its_split_and_leaves_the_photo_folder_as_it_was(
    tmp_path, make_cfg, project_cache_dir
):
    photos = tmp_path / "photos"
    make_class_folders(photos, COUNTS)
    before = folder_state(photos)
    # last_layer without augmentation: the verified-image record and the feature cache both
    metrics = train(make_cfg(*folder_overrides(photos), *TINY_MODEL, "augment=none", fast=False))
    assert metrics["feature_cache"] == "miss"
    assert folder_state(photos) == before  # not a file added, changed or touched
    assert Path(metrics["feature_cache_file"]).is_relative_to(project_cache_dir)
    record = check_split(tmp_path / "run", photos, 0.2)
    assert metrics["split_sizes"] == record["sizes"]

    other = make_cfg(
        *folder_overrides(photos),
        *TINY_MODEL,
        "augment=none",  # the split is what differs: the cached probe trains it fastest
        "data.split_seed=1",
        "data.val_fraction=0.4",
        fast=False,
    )
    other.run_dir = str(tmp_path / "other")
    train(other)
    moved = check_split(tmp_path / "other", photos, 0.4)
    assert moved["files"]["val"] != record["files"]["val"]
    assert folder_state(photos) == before


@pytest.mark.parametrize("dataset", ["hymenoptera", "flowers102"])
def test_a_failed_download_leaves_no_data_root_behind(
    tmp_path, make_cfg, monkeypatch, dataset, record_fault
):
    from torchvision.datasets import Flowers102

    unreachable = "http://127.0.0.1:9/"  # the discard port: refused at once, no network needed
    monkeypatch.setattr("finetune.data.layouts.HYMENOPTERA_URL", unreachable + "hymenoptera.zip")
    monkeypatch.setattr(Flowers102, "_download_url_prefix", unreachable)
    root = tmp_path / "not" / "yet"
    overrides = [f"data={dataset}", f"data.root={root}", *folder_overrides(root)[2:]]
    with pytest.raises(DataUnavailableError) as first:
        train(make_cfg(*overrides, fast=False))
    assert "127.0.0.1:9" in str(first.value) or "could not be downloaded" in str(first.value)
    assert not (tmp_path / "not").exists()
    with pytest.raises(DataUnavailableError) as second:
        train(make_cfg(*overrides, "data.download=false", fast=False))
    handled = f"{root} does not exist" in str(second.value)
    record_fault(handled and not (tmp_path / "not").exists())
    assert handled, str(second.value)


@pytest.mark.slow  # a train.py run: CI's slow step
def test_a_data_root_with_a_tilde_works_as_typed(tmp_path):
    """`data.root=~/photos` through train.py, with HOME and the default cache folder there."""
    home = tmp_path / "home"
    photos = home / "photos"
    make_class_folders(photos, COUNTS)
    before = folder_state(photos)
    env = subprocess_env() | {"HOME": str(home)}
    for name in ("FINETUNE_CACHE_DIR", "XDG_CACHE_HOME"):
        env.pop(name, None)
    kept = [o for o in folder_overrides(photos) if not o.startswith("data.root=")]
    result = run_train(*kept, "data.root=~/photos", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = check_split(tmp_path / "run", photos, 0.2)
    assert record["root"] == str(photos)
    assert any((home / ".cache" / "finetune-lab" / "verified").iterdir())  # the default
    assert folder_state(photos) == before
