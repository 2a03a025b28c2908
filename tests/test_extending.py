"""docs/extending.md followed step by step: a dataset layout and a freeze strategy added the
documented way, each trained for one step in-process. The steps that edit the package (the
registries `LAYOUTS`, `DATASETS`, `STRATEGIES` and `SCHEMAS`, a file in `conf/`) are made here on
the running package with monkeypatch and a conf folder of the test's own: the guide and this
test change together."""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import FAST_OVERRIDES, TINY_MODEL, compose_config, make_class_folders
from finetune import backbones, config, strategies
from finetune.config import SCHEMAS, schema, values
from finetune.data import LAYOUTS, DatasetSplits, LayoutOptions
from finetune.data.layouts import Layout
from finetune.run import train

TOY_COUNTS = {"train": {"red": 4, "blue": 4}, "val": {"red": 2, "blue": 2}}

# One step of training: the run still validates, evaluates and writes its run dir.
ONE_STEP = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "augment=none"]


# --- a dataset: a layout, its name in the schema, a file in conf/data -----------------------------


def fetch_toy(options: LayoutOptions) -> None:
    """Put the files in place: generated here, as a download would be."""
    folder = options.root / "toy"
    if not folder.is_dir():
        for split, counts in TOY_COUNTS.items():
            make_class_folders(folder / split, counts, seed=len(split))


def build_toy(options: LayoutOptions) -> DatasetSplits:
    """List the files: `(path, class index)` per split, nothing written."""
    class_names = sorted(TOY_COUNTS["train"])

    def samples(split: str) -> list[tuple[str, int]]:
        return [
            (str(path), class_names.index(path.parent.name))
            for path in sorted((options.root / "toy" / split).glob("*/*.jpg"))
        ]

    return DatasetSplits(class_names, samples("train"), samples("val"))


@pytest.fixture
def conf_folder(tmp_path) -> Path:
    """A conf folder searched after the project's (`hydra.searchpath`): the option files a
    contributor would add to conf/."""
    folder = tmp_path / "conf"
    (folder / "data").mkdir(parents=True)
    (folder / "strategy").mkdir()
    return folder


def compose(conf_folder: Path, tmp_path: Path, *overrides: str, data: str = "synthetic"):
    """The project's config with the fast overrides, `data=<data>` and `overrides`, one step."""
    fast = [o for o in FAST_OVERRIDES if data == "synthetic" or not o.startswith("data=")]
    fast = [o for o in fast if data == "synthetic" or not o.startswith("data.synthetic")]
    return compose_config(
        [
            *fast,
            *TINY_MODEL,
            f"data={data}",
            *ONE_STEP,
            *overrides,
            f"hydra.searchpath=[file://{conf_folder}]",
        ],
        tmp_path / "run",
        tmp_path / "data",
    )


def test_a_dataset_added_as_documented_trains(tmp_path, conf_folder, monkeypatch):
    monkeypatch.setitem(LAYOUTS, "toy", Layout(fetch_toy, build_toy))
    # The name in DATASETS (config/values.py): the schema's `data.dataset` field lists them.
    monkeypatch.setattr(values, "DATASETS", (*values.DATASETS, "toy"))
    dataset_field = {f.name: f for f in dataclasses.fields(schema.DataConfig)}["dataset"]
    allowed = {**dataset_field.metadata, "choices": values.DATASETS}
    monkeypatch.setattr(dataset_field, "metadata", types.MappingProxyType(allowed))
    (conf_folder / "data" / "toy.yaml").write_text(
        "defaults:\n  - base_data\n  - _self_\ndataset: toy\n"
    )

    cfg = compose(conf_folder, tmp_path, data="toy")
    metrics = train(cfg)

    assert (metrics["data"], metrics["split_sizes"]) == ("toy", {"train": 8, "val": 4})
    run_dir = Path(cfg.run_dir)
    assert json.loads((run_dir / "classes.json").read_text()) == ["blue", "red"]
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(split["files"]["val"]["red"]) == [f"toy/val/red/red_{i}.jpg" for i in (0, 1)]
    assert torch.load(metrics["best_checkpoint"], weights_only=True)["global_step"] == 1


# --- a strategy: a schema dataclass, a class, a file in conf/strategy ----------------------------


@dataclass
class BiasOnlyConfig(schema.BackboneTrainsConfig):
    """The schema of the strategy's keys: `name` and those the class takes."""

    name: str = "bias_only"


class BiasOnly(strategies.FreezeStrategy):
    """The head and every bias of the backbone train (BitFit); the rest is frozen. Built from
    its schema dataclass (`self.config`), as every strategy is."""

    config_class = BiasOnlyConfig
    config: BiasOnlyConfig

    def trainable_names(self, network: backbones.Network) -> set[str]:
        return {name for name, _ in network.net.named_parameters() if name.endswith(".bias")}


def test_a_strategy_added_as_documented_trains_what_it_names(tmp_path, conf_folder, monkeypatch):
    monkeypatch.setitem(strategies.STRATEGIES, "bias_only", BiasOnly)
    monkeypatch.setitem(SCHEMAS["strategy"], "base_bias_only", BiasOnlyConfig)
    config.register()  # what importing finetune.config does with SCHEMAS
    (conf_folder / "strategy" / "bias_only.yaml").write_text(
        "defaults:\n  - base_bias_only\n  - _self_\n"
    )

    cfg = compose(conf_folder, tmp_path, "strategy=bias_only", "strategy.bn=train_affine")
    metrics = train(cfg)

    network = backbones.build(cfg.model, num_classes=3, pretrained=False)
    head = network.head_parameter_names()
    expected = sum(
        p.numel() for n, p in network.net.named_parameters() if n.endswith(".bias") or n in head
    )
    assert metrics["strategy"] == "bias_only"
    assert metrics["trainable_params"] == expected < metrics["total_params"]
    assert torch.load(metrics["best_checkpoint"], weights_only=True)["global_step"] == 1
