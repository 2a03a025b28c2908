"""K-fold cross-validation: disjoint stratified folds that cover train+val, a test split kept out,
the fold recorded, and the sweep summary's mean +- std over folds."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import yaml

from conftest import data_module, make_class_folders
from finetune import summary
from finetune.data.folds import fold_assignment
from finetune.errors import FinetuneError
from finetune.input_spec import InputSpec

SPEC = InputSpec(
    crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear"
)


def test_folds_are_disjoint_cover_the_pool_and_keep_class_counts_within_one(tmp_path):
    make_class_folders(tmp_path, {"a": 11, "b": 7, "c": 3})
    pool = [(str(p), "abc".index(p.parent.name)) for p in sorted(tmp_path.rglob("*.jpg"))]
    fold_of = fold_assignment(pool, 5, seed=3)
    assert set(fold_of) == {path for path, _ in pool} and set(fold_of.values()) == set(range(5))
    for label in range(3):
        counts = Counter(fold_of[path] for path, member in pool if member == label)
        sizes = [counts.get(fold, 0) for fold in range(5)]
        assert max(sizes) - min(sizes) <= 1, (label, sizes)
    assert fold_assignment(pool, 5, seed=3) == fold_of
    assert fold_assignment(pool, 5, seed=4) != fold_of


def test_a_copy_goes_to_the_fold_of_its_original(tmp_path):
    make_class_folders(tmp_path, {"a": 6, "b": 6})
    shutil.copy(tmp_path / "a" / "a_0.jpg", tmp_path / "a" / "a_0 (1).jpg")
    pool = [(str(p), "ab".index(p.parent.name)) for p in sorted(tmp_path.rglob("*.jpg"))]
    fold_of = fold_assignment(pool, 3, seed=0)
    assert fold_of[str(tmp_path / "a" / "a_0 (1).jpg")] == fold_of[str(tmp_path / "a" / "a_0.jpg")]


def test_fold_i_validates_the_others_train_and_the_test_split_stays_out(tmp_path):
    for split, count in (("train", 8), ("val", 2), ("test", 3)):
        make_class_folders(tmp_path / split, {"a": count, "b": count}, seed=len(split))
    small = {"batch_size": 4, "num_workers": 0, "decode_cache_mb": 0}
    vals = []
    for fold in range(5):
        module = data_module("imagefolder", tmp_path, SPEC, **small, folds=5, fold=fold)
        module.prepare_data()
        splits = module.splits
        assert splits.sizes() == {"train": 16, "val": 4, "test": 6}
        assert not {p for p, _ in splits.train} & {p for p, _ in splits.val}
        assert all("/test/" in path for path, _ in splits.test)
        record = module.split_record()
        assert record["fold"] == {"index": fold, "of": 5}
        assert record["val_split"].startswith(f"fold {fold} of 5 stratified folds")
        vals += [path for path, _ in splits.val]
    assert len(vals) == len(set(vals)) == 20  # each image of train+val validates once


def test_a_fold_outside_the_folds_is_refused_with_the_sweep_that_runs_them(tmp_path):
    make_class_folders(tmp_path, {"a": 4, "b": 4})
    with pytest.raises(
        FinetuneError, match=r"data\.fold=5 is not one of the 5 folds.*-m data\.fold=0,1,2,3,4"
    ):
        data_module("imagefolder", tmp_path, SPEC, folds=5, fold=5)


def test_the_sweep_summary_averages_over_folds(tmp_path):
    for job, (fold, acc) in enumerate(((0, 0.8), (1, 0.9), (2, 1.0))):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        overrides = ["data.folds=3", f"data.fold={fold}"]
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        metrics = {"val/acc": acc, "strategy": "full", "model": "m", "split_sizes": {"train": 8}}
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(metrics))
    rows = summary.write_summary(tmp_path)
    (entry,) = summary.aggregate(rows)
    assert entry["runs"] == 3 and entry["val_acc_mean"] == pytest.approx(0.9)
    assert entry["val_acc_std"] == pytest.approx(0.1)
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Mean +- std over folds" in markdown and "0.9000 +- 0.1000" in markdown
