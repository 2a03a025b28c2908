"""Fault injection: kills, broken data, bad configs and states.

Every test injects one fault and records with the `record_fault` fixture (conftest.py) whether
it was handled with a clear message and how many finished checkpoints it lost; the tally is
printed at the end of the session (`faults injected`, `handled clearly`, `checkpoints lost`,
which must be 0).
"""

from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    FAST_OVERRIDES,
    TINY_MODEL,
    data_module,
    make_class_folders,
    run_train,
    subprocess_env,
)
from finetune.backbones import InputSpec
from finetune.data import FinetuneDataModule, to_rgb
from finetune.errors import DataUnavailableError, FinetuneError
from finetune.run import train

TIMING_FIELDS = {
    "fit_seconds",
    "run_seconds",
    "train_epoch_seconds",
    "feature_cache_seconds",
    "views_cache_seconds",
    "probe_seconds",  # a resumed run reports the probe its head was solved by, timing included
}


def loadable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def comparable(metrics: dict) -> dict:
    """metrics.json without what legitimately differs between two runs: timings, folders and
    whether the feature cache was filled by this run or an earlier one."""
    kept = {k: v for k, v in metrics.items() if k not in TIMING_FIELDS}
    kept["best_checkpoint"] = Path(kept["best_checkpoint"]).name
    kept.pop("feature_cache_file", None)
    kept.pop("feature_cache", None)
    kept.pop("views_cache_file", None)
    kept.pop("views_cache", None)
    for key in [k for k in kept if k.endswith("/top_losses")]:  # images under each run's data
        kept[key] = [row | {"path": Path(row["path"]).name} for row in kept[key]]
    return kept


# --- kill -9 and resume -------------------------------------------------------------------------

RESUMABLE = [
    *FAST_OVERRIDES,
    "strategy=full",
    "trainer.max_epochs=4",
    "trainer.deterministic=true",
    "optim.label_smoothing=0.1",
]

KILL_AT_STEP = """
import os, signal
from finetune.module import ClassifierModule

_original = ClassifierModule.training_step

def training_step(self, batch, batch_idx):
    if self.trainer.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(self, batch, batch_idx)

ClassifierModule.training_step = training_step
"""

KILL_DURING_SAVE = """
import io, os, signal
import torch

_original = torch.save
_calls = [0]

def save(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == {call} and hasattr(f, "write"):
        buffer = io.BytesIO()
        _original(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half a checkpoint
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(obj, f, *args, **kwargs)

torch.save = save
"""


def run_with_fault(tmp_path: Path, fault: str, *overrides: str):
    """train.py in a subprocess whose interpreter first runs `fault` (a sitecustomize)."""
    hook = tmp_path / "fault"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(textwrap.dedent(fault))
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    return run_train(*RESUMABLE, *overrides, env=env)


# A cached linear probe (features computed once, the head trains on them) resumes too.
CACHED_PROBE = ["strategy=last_layer", "augment=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict]:
    """metrics.json of the uninterrupted runs the killed ones are compared with, by name."""
    runs = {}
    for name, extra in (("full", []), ("cached", CACHED_PROBE)):
        root = tmp_path_factory.mktemp(f"uninterrupted_{name}")
        result = run_train(
            *RESUMABLE, *extra, f"data.root={root / 'data'}", f"hydra.run.dir={root / 'run'}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = json.loads((root / "run" / "metrics.json").read_text())
    return runs


@pytest.mark.slow  # two runs and a kill per case: CI's slow step runs it
@pytest.mark.parametrize(
    "fault,run",
    [
        pytest.param(KILL_AT_STEP.format(step=7), "full", id="kill-9-mid-epoch"),
        # saves: best + last after epoch 0, then epoch 1's: the 3rd save is cut in half
        pytest.param(KILL_DURING_SAVE.format(call=3), "full", id="kill-9-during-checkpoint-write"),
        pytest.param(KILL_AT_STEP.format(step=7), "cached", id="kill-9-cached-linear-probe"),
        # worker processes: Lightning's first iterator draws keys before the restored epoch
        pytest.param(KILL_AT_STEP.format(step=7), "workers", id="kill-9-loader-workers"),
    ],
)
def test_resume_after_kill_equals_an_uninterrupted_run(
    tmp_path, fault, run, uninterrupted, record_fault
):
    run_dir, data_root = tmp_path / "run", tmp_path / "data"
    extra = {"cached": CACHED_PROBE, "workers": ["data.num_workers=2"]}.get(run, [])
    options = [*extra, f"data.root={data_root}"]
    killed = run_with_fault(tmp_path, fault, *options, f"hydra.run.dir={run_dir}")
    assert killed.returncode == -9, killed.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    finished = list((run_dir / "checkpoints").glob("*.ckpt"))
    lost = sum(not loadable(p) for p in finished)  # a half-written file never replaces one
    assert last.is_file() and lost == 0
    epoch_before = torch.load(last, weights_only=True)["epoch"]

    resumed = run_train(*RESUMABLE, *options, f"hydra.run.dir={run_dir}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the data of each epoch is keyed by (epoch, index): the same whichever worker loads it
    expected = comparable(uninterrupted["full" if run == "workers" else run])
    record_fault(handled=comparable(metrics) == expected, lost=lost)
    assert epoch_before < 3
    assert comparable(metrics) == expected
    if run == "cached":
        # the report is the killed process's (as the uninterrupted run's); this one read its file
        assert metrics["feature_cache"] == "miss"
        assert "Reusing cached features" in resumed.stdout + resumed.stderr
        assert "Extracting features" not in resumed.stdout + resumed.stderr


@pytest.mark.slow  # four train.py processes: CI's slow step
@pytest.mark.parametrize("source", ["run_dir", "bare_checkpoint"])
def test_resume_from_a_checkpoint_of_other_classes_is_refused_with_the_way_out(
    tmp_path, source, record_fault
):
    """A run dir carries its config: the other data is named as a config change. A checkpoint
    file alone (copied out of its run) is checked against the data's classes."""
    first = run_train(*FAST_OVERRIDES, f"data.root={tmp_path}/a", f"hydra.run.dir={tmp_path}/r1")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt_path, expected = tmp_path / "r1", "data.dataset: 'synthetic' in the run, 'imagefolder' now"
    if source == "bare_checkpoint":
        ckpt_path = tmp_path / "copied.ckpt"
        ckpt_path.write_bytes((tmp_path / "r1" / "checkpoints" / "last.ckpt").read_bytes())
        expected = "trained for 3 classes"
    before = {p: p.read_bytes() for p in (tmp_path / "r1").rglob("*") if p.is_file()}
    make_class_folders(tmp_path / "folder", {"cat": 4, "dog": 4})
    fast = [o for o in FAST_OVERRIDES if not o.startswith("data")]
    result = run_train(
        *fast,
        "data=imagefolder",
        f"data.root={tmp_path / 'folder'}",
        f"hydra.run.dir={tmp_path}/r2",
        f"ckpt_path={ckpt_path}",
    )
    message = result.stderr + result.stdout
    handled = result.returncode == 1 and expected in message and "model.weights=" in message
    untouched = before == {p: p.read_bytes() for p in (tmp_path / "r1").rglob("*") if p.is_file()}
    record_fault(handled and untouched)
    assert handled and "Traceback" not in message, message[-2000:]
    assert untouched


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path, record_fault):
    result = run_train(
        *FAST_OVERRIDES, f"data.root={tmp_path}", "ckpt_path=last", f"hydra.run.dir={tmp_path}/n"
    )
    message = result.stderr + result.stdout
    handled = result.returncode == 1 and "No checkpoint to resume from" in message
    record_fault(handled)
    assert handled and "hydra.run.dir" in message


def test_a_truncated_checkpoint_is_refused_clearly(tmp_path, record_fault):
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 truncated")
    result = run_train(
        *FAST_OVERRIDES,
        f"data.root={tmp_path}",
        f"ckpt_path={tmp_path}/broken.ckpt",
        f"hydra.run.dir={tmp_path}/r",
    )
    message = result.stderr + result.stdout
    handled = result.returncode == 1 and "Cannot read the checkpoint" in message
    record_fault(handled)
    assert handled


# --- diverging loss, unwritable run dir, full disk, devices ---------------------------------------


@pytest.mark.parametrize(
    "nan_step,deferred,stopped_in",
    [(4, False, 4), (4, True, 5), (5, True, 5)],
    ids=["checked_at_once", "checked_a_step_late", "late_check_but_last_batch_of_epoch"],
)
def test_nan_loss_stops_at_the_step_and_keeps_the_last_good_checkpoint(
    make_cfg, monkeypatch, nan_step, deferred, stopped_in, record_fault
):
    """On the CPU the loss is checked at once; on accelerators one step late (no stall per
    step), which `deferred` forces here, except in an epoch's last batch, so that the epoch's
    checkpoint never holds diverged weights. Epoch 1 is steps 3-5 (batches 0-2)."""
    from finetune.module import ClassifierModule

    original = ClassifierModule.forward
    training_steps = []  # global step of every training forward pass

    def diverging(self, images):
        logits = original(self, images)
        if self.training:  # validation runs in eval mode
            training_steps.append(self.trainer.global_step)
            if self.trainer.global_step == nan_step:
                logits = logits * float("nan")  # and so the loss
        return logits

    monkeypatch.setattr(ClassifierModule, "forward", diverging)
    monkeypatch.setattr(ClassifierModule, "defer_loss_check", deferred)
    cfg = make_cfg(*TINY_MODEL, "strategy=full", "trainer.max_epochs=3")
    expected = rf"became nan at step {nan_step} \(epoch 1, batch {nan_step - 3}\)"
    with pytest.raises(FinetuneError, match=expected) as raised:
        train(cfg)
    assert training_steps[-1] == stopped_in
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    kept = loadable(last) and torch.load(last, weights_only=True)["epoch"] == 0
    record_fault("lower optim.optimizer.lr" in str(raised.value), lost=int(not kept))
    assert kept


def test_unwritable_run_dir_is_a_clear_error(make_cfg, tmp_path, record_fault):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_cfg()
    cfg.run_dir = str(blocker / "run")
    with pytest.raises(FinetuneError, match="Cannot write the run dir") as raised:
        train(cfg)
    record_fault("hydra.run.dir" in str(raised.value))


def test_full_disk_during_a_checkpoint_keeps_the_earlier_ones(make_cfg, monkeypatch, record_fault):
    from finetune import resume

    original, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "save", save)
    # A randomly initialised head: no feature cache for the probe, so every save is a checkpoint.
    cfg = make_cfg(*TINY_MODEL, "trainer.max_epochs=3", "strategy.head_init=random")
    with pytest.raises(FinetuneError, match="the disk is full") as raised:
        train(cfg)
    monkeypatch.undo()
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    written = list(checkpoints.glob("*.ckpt"))
    lost = sum(not loadable(p) for p in written) + int(len(written) < 2)
    assert not list(checkpoints.glob("*.partial"))
    record_fault("intact" in str(raised.value), lost=lost)
    assert lost == 0


@pytest.mark.parametrize("accelerator,devices", [("gpu", 1), ("cpu", 512)])
def test_more_devices_than_the_machine_has_is_a_clear_error(
    make_cfg, accelerator, devices, record_fault
):
    if accelerator == "gpu" and torch.cuda.device_count() >= devices:
        pytest.skip("this machine has the GPUs")
    cfg = make_cfg(f"trainer.accelerator={accelerator}", f"trainer.devices={devices}")
    with pytest.raises(FinetuneError, match=f"trainer.devices={devices}") as raised:
        train(cfg)
    written = list(Path(cfg.run_dir).glob("*")) if Path(cfg.run_dir).exists() else []
    record_fault("Fix:" in str(raised.value) and not written)
    assert not written  # refused before anything is written


def test_unknown_names_list_the_valid_ones(tmp_path, record_fault):
    fast = [o for o in FAST_OVERRIDES if not o.startswith("model")]
    result = run_train(
        *fast,
        f"data.root={tmp_path}",
        "model=resnet18",
        "model.name=resnet_51",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    message = result.stderr + result.stdout
    handled = result.returncode == 1 and "resnet50" in message and "Traceback" not in message
    record_fault(handled)
    assert handled


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, record_fault):
    result = run_train(
        "-m", *FAST_OVERRIDES, *TINY_MODEL, "strategy=top_k", "strategy.k=100,2",  # 100: at run time
        f"data.root={tmp_path}/data", f"hydra.sweep.dir={tmp_path}/sweep",
    )  # fmt: skip
    rows = (tmp_path / "sweep" / "summary.csv").read_text()
    handled = result.returncode == 0 and (tmp_path / "sweep" / "1" / "metrics.json").is_file()
    record_fault(handled and "asks for more blocks than the 6" in rows, shown=rows)
    assert handled
    # the failed job's message, once, without a traceback: it is a FinetuneError
    assert "This run failed; the sweep goes on: strategy.k=100" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


# --- bad data -------------------------------------------------------------------------------------

SPEC = InputSpec(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


def folder_module(root: Path, **options) -> FinetuneDataModule:
    return data_module("imagefolder", root, SPEC, num_workers=0, **options)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def broken_folder(tmp_path) -> Path:
    make_class_folders(tmp_path / "train", {"cat": 5, "dog": 5})
    make_class_folders(tmp_path / "val", {"cat": 2, "dog": 2}, seed=1)
    truncate(tmp_path / "train" / "cat" / "cat_1.jpg")
    (tmp_path / "val" / "dog" / "dog_0.jpg").write_bytes(b"this is not a jpeg")
    return tmp_path


def test_corrupt_images_are_all_named_before_training(broken_folder, record_fault):
    with pytest.raises(DataUnavailableError) as raised:
        folder_module(broken_folder).prepare_data()
    message = str(raised.value)
    handled = "cat_1.jpg" in message and "dog_0.jpg" in message and "skip_corrupt" in message
    record_fault(handled)
    assert handled and message.startswith("2 image file(s)")


def test_skip_corrupt_trains_without_them_and_lists_them(broken_folder, make_cfg, record_fault):
    fast = [o for o in FAST_OVERRIDES if not o.startswith("data")]
    options = ["data=imagefolder", f"data.root={broken_folder}", "data.skip_corrupt=true"]
    cfg = make_cfg(*fast, *options, *TINY_MODEL, fast=False)
    metrics = train(cfg)
    skipped = json.loads((Path(cfg.run_dir) / "skipped_images.json").read_text())
    handled = metrics["skipped_images"] == 2 and metrics["split_sizes"] == {"train": 9, "val": 3}
    record_fault(handled and any(p.endswith("cat_1.jpg") for p in skipped))
    assert handled


def test_odd_image_modes_become_the_right_rgb(tmp_path, record_fault):
    grey = Image.new("L", (4, 4), 100)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))  # fully transparent red -> white
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    sixteen = Image.fromarray(np.full((4, 4), 51400, dtype=np.uint16))  # PIL alone: 255
    expected = {
        "L": (100, 100, 100),
        "P": (10, 200, 30),
        "RGBA": (255, 255, 255),
        "CMYK": (255, 0, 0),
        "I;16": (200, 200, 200),
    }
    converted = {}
    for image in (grey, palette, rgba, cmyk, sixteen):
        path = (
            tmp_path / f"{image.mode.replace(';', '')}.{'tif' if image.mode == 'CMYK' else 'png'}"
        )
        image.save(path)
        with Image.open(path) as reopened:
            rgb = to_rgb(reopened)
        converted[image.mode] = rgb.getpixel((0, 0))
        assert rgb.mode == "RGB"
    record_fault(converted == expected)
    assert converted == expected


@pytest.mark.parametrize(
    "layout,match",
    [
        ("empty_class", "Class 'dog' has no images"),
        ("missing_in_val", "Class 'dog' has no images in"),
        ("extra_in_val", "has class folders that train/ lacks: bird"),
        ("no_images", "No class folders"),
        ("missing_root", "does not exist"),
    ],
)
def test_broken_folder_layouts_name_the_folder(tmp_path, layout, match, record_fault):
    root = tmp_path / "data"
    if layout != "missing_root":
        make_class_folders(root / "train", {"cat": 3, "dog": 3})
        make_class_folders(root / "val", {"cat": 2, "dog": 2})
    if layout == "empty_class":
        for path in (root / "train" / "dog").iterdir():
            path.unlink()
        (root / "train" / "dog" / "notes.txt").write_text("no images here")
    elif layout == "missing_in_val":
        for path in (root / "val" / "dog").iterdir():
            path.unlink()
        (root / "val" / "dog").rmdir()
    elif layout == "extra_in_val":
        make_class_folders(root / "val", {"bird": 1})
    elif layout == "no_images":
        root.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            for folder in (root / split).iterdir():
                for path in folder.iterdir():
                    path.unlink()
                folder.rmdir()
    with pytest.raises(DataUnavailableError, match=match) as raised:
        folder_module(root).prepare_data()
    record_fault(str(root) in str(raised.value))
    assert str(root) in str(raised.value)


def test_non_image_and_hidden_files_are_ignored(tmp_path, record_fault):
    make_class_folders(tmp_path / "train", {"cat": 3, "dog": 3})
    make_class_folders(tmp_path / "val", {"cat": 1, "dog": 1})
    (tmp_path / "train" / "cat" / "README.md").write_text("notes")
    (tmp_path / "train" / "cat" / "._cat_0.jpg").write_bytes(b"\x00\x05\x16\x07 apple double")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\x00")
    checkpoints = tmp_path / "train" / "dog" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    Image.new("RGB", (8, 8)).save(checkpoints / "dog_0-checkpoint.jpg")
    (tmp_path / "train" / ".hidden_class").mkdir()
    module = folder_module(tmp_path)
    module.prepare_data()
    names = [Path(p).name for p, _ in module.splits.train]
    handled = module.class_names == ["cat", "dog"] and sorted(names) == sorted(
        [f"cat_{i}.jpg" for i in range(3)] + [f"dog_{i}.jpg" for i in range(3)]
    )
    record_fault(handled)
    assert handled


def test_resume_from_a_checkpoint_of_another_architecture_is_refused(tmp_path, record_fault):
    from finetune.resume import check_compatible

    checkpoint = tmp_path / "other.ckpt"
    hparams = {"class_names": ["a", "b"], "model": {"name": "resnet18"}}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, checkpoint)
    check_compatible(str(checkpoint), ["a", "b"], "resnet18")  # the same experiment: fine
    with pytest.raises(FinetuneError, match="it holds a resnet18, this run builds a resnet50") as e:
        check_compatible(str(checkpoint), ["a", "b"], "resnet50")
    record_fault(f"model.weights={checkpoint}" in str(e.value))
    assert f"model.weights={checkpoint}" in str(e.value)
