"""Resuming continues the interrupted run, or refuses before touching anything; the best
checkpoint is the best one; every run ends with one line naming it.

Each test checks values: hashes of every file of the run dir, learning rates per step, the
epoch kept, the points of the TensorBoard curves.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.demos.boring_classes import BoringModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics import Metric, MetricCollection

from conftest import (
    FAST_OVERRIDES,
    REPO,
    TINY_MODEL,
    make_class_folders,
    run_train,
    subprocess_env,
)
from finetune import callbacks, features, interrupt, resume, resume_config
from finetune import module as module_lib
from finetune.config import ConfigError, check_overrides
from finetune.errors import FinetuneError
from finetune.optim import ConfiguredLambdaLR, WarmupSchedule
from finetune.run import train


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) -> the SHA-256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --- resuming with the run's own config ----------------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A finished 1-epoch `strategy=full` run; each test resumes a copy of it."""
    root = tmp_path_factory.mktemp("one_epoch")
    result = run_train(
        *FAST_OVERRIDES,
        "strategy=full",
        f"data.root={root / 'data'}",
        f"hydra.run.dir={root / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def copy_run(one_epoch_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run / "run", run_dir)
    # the saved config names the original folder: write the copy's into it and its .hydra/
    for name in ("config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml"):
        path = run_dir / name
        path.write_text(path.read_text().replace(str(one_epoch_run / "run"), str(run_dir)))
    return run_dir


def test_resume_with_the_run_dir_alone_continues_with_the_saved_config(
    one_epoch_run, tmp_path, record_fault
):
    run_dir = copy_run(one_epoch_run, tmp_path)
    before = file_hashes(run_dir)
    result = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    after = file_hashes(run_dir)
    kept = ["config.yaml", "classes.json", "weights_report.json"]
    kept += [f".hydra/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    unchanged = all(after[name] == before[name] for name in kept)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the run's own model and strategy, not the defaults (mobilenet_v2, last_layer)
    continued = (metrics["model"], metrics["strategy"], metrics["epochs"]) == (
        "efficientnet_lite0",
        "full",
        2,
    )
    log = (run_dir / "train.log").read_text()
    record_fault(unchanged and continued and not (run_dir / "failure.json").exists())
    assert unchanged and continued
    assert not (run_dir / "failure.json").exists()
    assert "trainer.max_epochs changed from 1 to 2" in log
    assert f"Resuming {run_dir} from epoch 1 (last.ckpt) into {run_dir}" in log
    # Lightning's own lines of the resumed process go to train.log too, with the log prefix
    resumed_log = log[log.index("trainer.max_epochs changed from 1 to 2") :]
    assert "][pytorch_lightning.utilities.rank_zero][INFO] - Restored all states" in resumed_log
    # the copy resumes with its checkpoints where they are: Lightning's warnings say otherwise
    warned = result.stdout + result.stderr
    assert "exists and is not empty" not in warned and "dirpath has changed" not in warned
    assert "LeafSpec" not in warned  # Lightning's deprecated torch call, printed on restore
    # the epoch trained before the resume is timed too (EpochTimer's list is in the checkpoint)
    first = json.loads((one_epoch_run / "run" / "metrics.json").read_text())
    assert len(metrics["train_epoch_seconds"]) == 2
    assert metrics["train_epoch_seconds"][0] == pytest.approx(
        first["train_epoch_seconds"][0], abs=0.5
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    # fit_seconds counts the first process's fit too (up to its checkpoint), not only the resume's
    assert metrics["fit_seconds"] > first["fit_seconds"] + metrics["train_epoch_seconds"][1] - 0.5
    assert metrics["run_seconds"] > metrics["fit_seconds"]  # the run holds its fit


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["model=resnet18"], "model.name: 'efficientnet_lite0' in the run, 'resnet18' now"),
        (["seed=7"], "seed: 42 in the run, 7 now"),
        (["strategy=last_layer"], "strategy.name: 'full' in the run, 'last_layer' now"),
        (["data.batch_size=2"], "data.batch_size: 4 in the run, 2 now"),
    ],
)
def test_a_resume_override_the_checkpoint_cannot_follow_is_refused_before_anything_is_written(
    one_epoch_run, tmp_path, overrides, named, record_fault
):
    run_dir = copy_run(one_epoch_run, tmp_path)
    before = file_hashes(run_dir)
    result = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", *overrides)
    message = result.stdout + result.stderr
    untouched = file_hashes(run_dir) == before
    record_fault(result.returncode == 1 and named in message and untouched)
    assert result.returncode == 1 and named in message, message[-2000:]
    assert "Traceback" not in message
    assert untouched


def test_a_refused_data_option_lists_only_what_it_changes_and_names_the_override(
    one_epoch_run, tmp_path
):
    """`data=hymenoptera` drops the run's saved `data.synthetic.*`; the run's other overrides
    (model, batch size) still apply, so they are not listed as changed."""
    run_dir = copy_run(one_epoch_run, tmp_path)
    before = file_hashes(run_dir)
    result = run_train(
        f"hydra.run.dir={run_dir}", "ckpt_path=last", "data=hymenoptera", "print_config=false"
    )
    message = result.stdout + result.stderr
    assert result.returncode == 1, message[-2000:]
    listed = message[message.index("Cannot resume") :]
    # print_config=false is a change a resume follows: not blamed
    assert "(the overrides data=hymenoptera change): data.dataset: 'synthetic'" in listed
    assert "model.name" not in listed and "data.batch_size" not in listed
    assert file_hashes(run_dir) == before


@pytest.mark.slow  # two runs: CI's slow step
def test_a_resume_refused_after_the_data_changed_leaves_every_file_as_it_was(
    tmp_path, record_fault
):
    """A 3-class run whose folder now holds 2 classes: refused once the data is read (after
    Hydra started and opened the log), and still no file of the run dir changed."""
    folder, run_dir = tmp_path / "photos", tmp_path / "run"
    make_class_folders(folder, {"ant": 5, "bee": 5, "wasp": 5})
    fast = [o for o in FAST_OVERRIDES if not o.startswith("data=") and "synthetic" not in o]
    first = run_train(*fast, "data=imagefolder", f"data.root={folder}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(folder / "wasp")
    before = file_hashes(run_dir)
    result = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2")
    message = result.stdout + result.stderr
    refused = result.returncode == 1 and "trained for 3 classes" in message
    untouched = file_hashes(run_dir) == before
    record_fault(refused and untouched)
    assert refused, message[-2000:]
    assert json.loads((run_dir / "classes.json").read_text()) == ["ant", "bee", "wasp"]
    assert untouched


@pytest.mark.slow  # two train.py processes: CI's slow step
def test_a_resume_on_changed_files_is_refused_not_re_split(tmp_path, record_fault):
    """val_fraction split, one training image deleted: the data module would re-split (a former
    val image then trains); the resume is refused and split.json still tells the truth."""
    folder, run_dir = tmp_path / "photos", tmp_path / "run"
    make_class_folders(folder, {"ant": 6, "bee": 6})
    fast = [o for o in FAST_OVERRIDES if not o.startswith("data=") and "synthetic" not in o]
    first = run_train(
        *fast, "data=imagefolder", f"data.root={folder}", "data.val_fraction=0.34",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    split = json.loads((run_dir / "split.json").read_text())
    (folder / split["files"]["train"]["ant"][0]).unlink()
    before = file_hashes(run_dir)
    result = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2")
    message = result.stdout + result.stderr
    refused = result.returncode == 1 and "1 files of the run are missing" in message
    untouched = file_hashes(run_dir) == before
    record_fault(refused and untouched)
    assert refused, message[-2000:]
    assert "model.weights=" in message and "Traceback" not in message
    assert untouched


def test_a_resume_asking_for_no_more_epochs_is_refused_before_anything_is_written(
    one_epoch_run, tmp_path, record_fault
):
    """The finished 1-epoch run resumed with its own trainer.max_epochs=1: nothing to train;
    without the check Lightning evaluates again and rewrites the run's results."""
    run_dir = copy_run(one_epoch_run, tmp_path)
    before = file_hashes(run_dir)
    result = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last")
    message = result.stdout + result.stderr
    refused = result.returncode == 1 and "has trained 1 epoch(s)" in message
    untouched = file_hashes(run_dir) == before
    record_fault(refused and untouched)
    assert refused, message[-2000:]
    assert "trainer.max_epochs=2" in message and "Traceback" not in message
    assert untouched


# --- the schedule on resume -----------------------------------------------------------------------


def schedule_after(total_steps: int, steps_per_epoch: int, resumed: dict | None = None):
    """A cosine schedule with a 1-epoch warmup over a 2-group SGD (rates 0.01 and 0.001),
    optionally restored from `resumed` (a scheduler state dict)."""
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(
        [{"params": [weights[0]], "lr": 0.01}, {"params": [weights[1]], "lr": 0.001}]
    )
    schedule = WarmupSchedule(
        "cosine", total_steps, steps_per_epoch, warmup_epochs=1, min_lr_ratio=0.01
    )
    scheduler = ConfiguredLambdaLR(optimizer, schedule)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
    return optimizer, scheduler


def rates(optimizer, scheduler, steps: int) -> list[float]:
    """The rate of every group at each of `steps` steps, one flat list."""
    seen = []
    for _ in range(steps):
        seen += [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("per_epoch_after", [3, 6], ids=["same_steps_per_epoch", "twice_as_many"])
def test_a_resumed_schedule_is_the_configs_not_the_checkpoints(per_epoch_after, record_fault):
    """1 epoch of 3 steps trained with max_epochs=1, resumed with max_epochs=3: the rates of
    epochs 2-3 are an uninterrupted 3-epoch run's, also when the epoch has other steps now
    (other devices or batch count): the schedule continues at the same epoch position."""
    optimizer, scheduler = schedule_after(total_steps=3, steps_per_epoch=3)
    rates(optimizer, scheduler, 3)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    total = 3 * per_epoch_after
    resumed = rates(*schedule_after(total, per_epoch_after, saved), 2 * per_epoch_after)
    whole = rates(*schedule_after(total, per_epoch_after), total)[2 * per_epoch_after :]
    equal = resumed == pytest.approx(whole, rel=1e-12)
    record_fault(equal)
    assert resumed[0] == pytest.approx(0.01 * (0.01 + 0.99 * 0.5 * (1 + 1)))  # cosine start
    assert equal


def lr_trace(monkeypatch) -> list[tuple[int, list[float]]]:
    """(global step, the rate of every param group) of every training step of the runs after."""
    trace: list[tuple[int, list[float]]] = []
    original = module_lib.ClassifierModule.training_step

    def training_step(self, batch, batch_idx):
        groups = self.trainer.optimizers[0].param_groups
        trace.append((self.trainer.global_step, [group["lr"] for group in groups]))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.ClassifierModule, "training_step", training_step)
    return trace


@pytest.mark.parametrize("strategy", ["full", "gradual"])
def test_resumed_with_more_epochs_the_rates_equal_an_uninterrupted_run(
    make_cfg, tmp_path, monkeypatch, strategy, record_fault
):
    """Every param group's rate at every step of epochs 2-3 (gradual: the groups of the blocks
    that join after the resume too) equals the uninterrupted 3-epoch run's."""
    trace = lr_trace(monkeypatch)
    options = [f"strategy={strategy}", "optim.optimizer.lr=0.01"]
    whole = make_cfg(*options, "trainer.max_epochs=3")
    whole.run_dir = str(tmp_path / "whole")
    train(whole)
    uninterrupted, trace[:] = dict(trace), []

    train(make_cfg(*options, "trainer.max_epochs=1"))
    trace[:] = []
    train(make_cfg(*options, "trainer.max_epochs=3", "ckpt_path=last"))
    resumed = dict(trace)
    assert sorted(resumed) == list(range(3, 9))
    equal = all(resumed[s] == pytest.approx(uninterrupted[s], rel=1e-9) for s in resumed)
    record_fault(equal)
    if strategy == "gradual":
        assert len(resumed[8]) > len(resumed[3])  # blocks joined after the resume
    assert equal


# --- the best checkpoint --------------------------------------------------------------------------


class AlwaysOne(Metric):
    """An accuracy of 1.0 whatever the predictions: every epoch ties."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("seen", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.seen += target.numel()

    def compute(self) -> torch.Tensor:
        return torch.tensor(1.0)


def test_ties_of_val_acc_keep_the_epoch_with_the_lowest_val_loss(
    make_cfg, monkeypatch, record_fault
):
    monkeypatch.setattr(
        module_lib,
        "accuracy_metrics",
        lambda num_classes, **_: MetricCollection({"acc": AlwaysOne()}),
    )
    cfg = make_cfg("strategy=full", "trainer.max_epochs=4")
    metrics = train(cfg)
    events = EventAccumulator(str(Path(cfg.run_dir) / "tensorboard"))
    events.Reload()
    losses = [event.value for event in events.Scalars("val/loss")]
    best = min(range(len(losses)), key=losses.__getitem__)
    kept = metrics["best_epoch"] == best and Path(metrics["best_checkpoint"]).name.startswith(
        f"epoch{best:03d}"
    )
    record_fault(kept)
    assert len(losses) == 4 and best != 0  # the stock callback keeps epoch 0
    assert kept
    assert metrics["val/loss"] == pytest.approx(losses[best], rel=1e-4)
    # the best checkpoint's re-validation is one point under its own tag, not a 5th val/ point
    assert len(events.Scalars("val/acc")) == 4
    assert [e.value for e in events.Scalars("best/val/loss")] == pytest.approx(
        [losses[best]], rel=1e-4
    )
    # so are its accuracies per class (and the test split's), one point each under best/
    scalars = events.Tags()["scalars"]
    assert [tag for tag in scalars if tag.startswith("val/acc_per_class")] == []
    for stage in ("val", "test"):
        for score in ("acc", "precision", "recall", "f1"):
            per_class = [t for t in scalars if t.startswith(f"best/{stage}/{score}_per_class/")]
            assert len(per_class) == 3 and all(len(events.Scalars(t)) == 1 for t in per_class)


class ScoredEpochs(BoringModel):
    """Lightning's boring model whose epoch e validates at `scores[e]` (val/acc, val/loss 1)."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", self.scores[self.current_epoch])
        self.log("val/loss", 1.0)


class OfferAtStart(pl.Callback):
    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics, self.kept = metrics, None

    def on_train_start(self, trainer, pl_module):
        self.kept = callbacks.keep_as_candidate(
            trainer.checkpoint_callback, trainer, "probe", self.metrics
        )


@pytest.mark.parametrize(
    ("scores", "best"),
    [([0.4, 0.5, 0.45], "probe-val_acc0.5000.ckpt"), ([0.4, 0.6, 0.45], "epoch1.ckpt")],
)
def test_a_candidate_kept_before_training_is_replaced_only_by_a_better_epoch(
    tmp_path, scores, best
):
    keeper = callbacks.BestCheckpoint(
        dirpath=tmp_path,
        filename="epoch{epoch}",
        auto_insert_metric_name=False,
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        save_last=True,
    )
    offer = OfferAtStart({"val/acc": 0.5, "val/loss": 1.0})
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[keeper, offer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(ScoredEpochs(scores))
    assert offer.kept == str(tmp_path / "probe-val_acc0.5000.ckpt")
    # a tie (0.5 at the same val/loss) keeps the candidate, as it keeps an earlier epoch
    assert Path(keeper.best_model_path).name == best
    # the loser's file is deleted; last.ckpt is the last epoch's, never the candidate's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([best, "last.ckpt"])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] > 0
    saved = torch.load(keeper.best_model_path, weights_only=True)
    assert saved["global_step"] == (0 if best.startswith("probe") else 4)
    # a keeper that already holds a checkpoint (a resumed run) takes no candidate
    assert callbacks.keep_as_candidate(keeper, trainer, "probe", {"val/acc": 1.0}) is None


def best_keeper(dirpath: Path) -> callbacks.BestCheckpoint:
    """The best-by-val/acc keeper of one checkpoint, files named epoch<e>.ckpt."""
    return callbacks.BestCheckpoint(
        dirpath=dirpath, filename="epoch{epoch}", auto_insert_metric_name=False,
        monitor="val/acc", mode="max", save_top_k=1,
    )  # fmt: skip


def small_trainer(kept_by: callbacks.BestCheckpoint, epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, callbacks=[kept_by], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=2, limit_val_batches=1,
    )  # fmt: skip


def test_a_moved_run_dir_keeps_its_best_checkpoint_on_resume(tmp_path):
    """Lightning's callback forgets the kept checkpoints when its dirpath changed; a resumed
    copy of a run would then keep a worse epoch than the run's best."""
    first, copy = tmp_path / "first", tmp_path / "copy"
    ran = best_keeper(first)
    small_trainer(ran, 2).fit(ScoredEpochs([0.6, 0.5]))
    shutil.copytree(first, copy)
    resumed = best_keeper(copy)
    resumed.load_state_dict(ran.state_dict())
    assert resumed.best_model_path == str(copy / "epoch0.ckpt") == resumed.kth_best_model_path
    assert list(resumed.best_k_models) == [str(copy / "epoch0.ckpt")]
    assert float(resumed.best_model_score) == pytest.approx(0.6)
    assert list(resumed.tie_values) == [str(copy / "epoch0.ckpt")]


def test_a_resume_into_a_new_run_dir_copies_the_kept_best_and_leaves_the_old_run_alone(tmp_path):
    """`ckpt_path=<run> hydra.run.dir=<new>`: the new run holds the best so far (the evaluation
    read a path in the new dir that did not exist: FileNotFoundError), and a better epoch
    replaces the copy, never the other run's file."""
    first, new = tmp_path / "first", tmp_path / "new"
    ran = best_keeper(first)
    small_trainer(ran, 2).fit(ScoredEpochs([0.6, 0.5, 0.7]))
    state, before = ran.state_dict(), sorted(p.name for p in first.iterdir())
    resumed = best_keeper(new)
    resumed.load_state_dict(state)
    assert resumed.best_model_path == str(new / "epoch0.ckpt")
    assert (new / "epoch0.ckpt").read_bytes() == (first / "epoch0.ckpt").read_bytes()
    # gone from both places: the ranking starts afresh instead of naming a missing file
    (new / "epoch0.ckpt").unlink()
    shutil.move(first / "epoch0.ckpt", tmp_path / "elsewhere.ckpt")
    afresh = best_keeper(tmp_path / "third")
    afresh.load_state_dict(state)
    assert afresh.best_model_path == "" and afresh.best_k_models == {}
    shutil.move(tmp_path / "elsewhere.ckpt", first / "epoch0.ckpt")
    # a resumed fit whose epoch 2 beats the copy deletes the copy, not the first run's file
    resumed = best_keeper(new)
    small_trainer(resumed, 3).fit(
        ScoredEpochs([0.6, 0.5, 0.7]), ckpt_path=str(first / "epoch0.ckpt")
    )
    assert Path(resumed.best_model_path) == new / "epoch2.ckpt"
    assert sorted(p.name for p in new.iterdir()) == ["epoch2.ckpt"]
    assert sorted(p.name for p in first.iterdir()) == before


# --- Ctrl-C and the closing line ------------------------------------------------------------------

CTRL_C_AT_STEP = """
import os, signal
from finetune.module import ClassifierModule

_original = ClassifierModule.training_step

def training_step(self, batch, batch_idx):
    at = int(os.environ.get("CTRL_C_STEP", "4"))
    if self.trainer.global_step == at and not os.environ.get("NO_CTRL_C"):
        os.kill(os.getpid(), signal.SIGINT)
    return _original(self, batch, batch_idx)

ClassifierModule.training_step = training_step
"""


def hooked_env(tmp_path: Path, code: str) -> dict[str, str]:
    """A train.py environment whose interpreter first runs `code` (as a sitecustomize)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(code))
    env = subprocess_env()
    env["PYTHONPATH"] = f"{hook}:{env.get('PYTHONPATH', '')}"
    return env


@pytest.mark.slow  # a run, an interrupt and its continuation: CI's slow step
def test_ctrl_c_prints_and_logs_the_command_that_continues_the_run(tmp_path, record_fault):
    env = hooked_env(tmp_path, CTRL_C_AT_STEP)
    run_dir = tmp_path / "run"
    result = run_train(
        *FAST_OVERRIDES, "strategy=full", "trainer.max_epochs=3", f"data.root={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}", env=env,
    )  # fmt: skip
    message = result.stdout + result.stderr
    found = re.search(r"Continue it with: (.+)$", message, re.MULTILINE)
    assert result.returncode == 130, message[-3000:]
    assert found and str(run_dir) in found.group(1)
    assert found.group(1) in (run_dir / "train.log").read_text()
    config_before = (run_dir / "config.yaml").read_bytes()

    command = shlex.split(found.group(1))
    assert command[0] == "python"
    resumed = run_train(*command[2:], env=env | {"NO_CTRL_C": "1"})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    continued = resumed.returncode == 0 and metrics["epochs"] == 3
    record_fault(continued)
    assert continued, resumed.stderr[-3000:]
    assert command[1] == str(REPO / "train.py") or Path(command[1]).resolve() == REPO / "train.py"
    assert (run_dir / "config.yaml").read_bytes() == config_before

    # every run ends with one line: the metric that chose the best checkpoint, its epoch and
    # its val and test numbers
    last_line = (run_dir / "train.log").read_text().strip().splitlines()[-1]
    expected = (
        f"Best checkpoint by val/acc {metrics['val/acc']:.4f}: epoch {metrics['best_epoch']}; "
        f"val/acc {metrics['val/acc']:.4f}, balanced_acc {metrics['val/balanced_acc']:.4f}, "
        f"macro_f1 {metrics['val/macro_f1']:.4f}; test/acc {metrics['test/acc']:.4f}, "
        f"balanced_acc {metrics['test/balanced_acc']:.4f}, macro_f1 {metrics['test/macro_f1']:.4f}."
    )
    assert expected in last_line


@pytest.mark.slow  # an interrupted resume: CI's slow step
def test_ctrl_c_of_a_resume_prints_the_overrides_it_applied(one_epoch_run, tmp_path):
    """A 1-epoch run resumed with trainer.max_epochs=40, stopped in its 3rd epoch: the printed
    command carries trainer.max_epochs=40; without it the run would ask for 1 epoch and is
    refused with the fix, every file unchanged."""
    env = hooked_env(tmp_path, CTRL_C_AT_STEP)
    env["CTRL_C_STEP"] = "7"  # 3 steps per epoch: in the 3rd epoch, 2 epochs trained
    run_dir = copy_run(one_epoch_run, tmp_path)
    result = run_train(
        f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=40", env=env
    )
    message = result.stdout + result.stderr
    found = re.search(r"Continue it with: (.+)$", message, re.MULTILINE)
    assert result.returncode == 130, message[-3000:]
    command = shlex.split(found.group(1))
    assert command[2:] == [f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=40"]

    before = file_hashes(run_dir)
    plain = run_train(*command[2:4])
    message = plain.stdout + plain.stderr
    assert plain.returncode == 1 and "has trained 2 epoch(s)" in message, message[-2000:]
    assert "Traceback" not in message
    assert file_hashes(run_dir) == before


STOP_AT_STEP = """
import os, signal
from finetune.module import ClassifierModule

_original = ClassifierModule.training_step

def training_step(self, batch, batch_idx):
    if self.trainer.global_step == int(os.environ.get("STOP_STEP", "0")):
        if os.environ["STOP_BY"] == "ctrl_c":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise RuntimeError("a fault in the first epoch")
    return _original(self, batch, batch_idx)

ClassifierModule.training_step = training_step
"""


@pytest.mark.parametrize("stop", ["ctrl_c", "error"])
def test_a_new_run_stopped_before_its_first_checkpoint_leaves_no_run_dir(tmp_path, stop):
    """Ctrl-C or an error in the first epoch left a run dir of a config, a log, a split and
    empty logger folders (and a failure.json): nothing to continue from or to look at. A
    folder that existed before the run is the user's: it stays."""
    env = hooked_env(tmp_path, STOP_AT_STEP) | {"STOP_BY": stop}
    options = [*FAST_OVERRIDES, *TINY_MODEL, "strategy=full", f"data.root={tmp_path / 'data'}"]
    run_dir = tmp_path / "runs" / "new"
    result = run_train(*options, f"hydra.run.dir={run_dir}", env=env)
    message = result.stdout + result.stderr
    assert result.returncode == (130 if stop == "ctrl_c" else 1), message[-3000:]
    assert not run_dir.exists() and (tmp_path / "runs").is_dir()
    if stop == "ctrl_c":
        said = [line for line in message.splitlines() if "nothing was kept" in line]
        assert len(said) == 1 and f"the run dir {run_dir} was removed" in said[0], message[-3000:]
        assert "Continue it with" not in message and "Traceback" not in message
    else:
        assert "a fault in the first epoch" in message  # the error and its traceback
        assert f"Nothing was kept: the run dir {run_dir} was removed." in message

    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    again = run_train(*options, f"hydra.run.dir={run_dir}", env=env)
    message = again.stdout + again.stderr
    assert again.returncode == result.returncode, message[-3000:]
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "config.yaml").is_file()
    assert "was removed" not in message
    if stop == "ctrl_c":
        assert f"{run_dir} holds no checkpoint to continue from" in message


def test_ctrl_c_after_the_first_checkpoint_keeps_the_run_dir_and_says_how_to_continue(tmp_path):
    env = hooked_env(tmp_path, STOP_AT_STEP) | {"STOP_BY": "ctrl_c", "STOP_STEP": "3"}
    run_dir = tmp_path / "run"
    result = run_train(
        *FAST_OVERRIDES, *TINY_MODEL, "strategy=full", "trainer.max_epochs=2",
        f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", env=env,
    )  # fmt: skip
    message = result.stdout + result.stderr
    assert result.returncode == 130, message[-3000:]  # 3 steps an epoch: in the second one
    assert f"Continue it with: python {REPO / 'train.py'} hydra.run.dir={run_dir}" in message
    assert "nothing was kept" not in message
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "train.log").is_file()


CTRL_C_IN_EVALUATION = """
import os, signal
from finetune.module import ClassifierModule

def on_validation_start(self):
    if self.trainer.state.fn == "validate":  # the best checkpoint's evaluation, after fit
        os.kill(os.getpid(), signal.SIGINT)

ClassifierModule.on_validation_start = on_validation_start
"""


@pytest.mark.slow  # two train.py runs: CI's slow step
def test_ctrl_c_after_the_last_epoch_is_continued_by_the_command_it_prints(tmp_path, record_fault):
    """Ctrl-C in the final evaluation exited 1 without the continue command (Lightning's
    exit(1) there was not read as Ctrl-C), and a resume of a run that trained all its epochs
    was refused as "nothing to resume": the run could not be finished at its own length."""
    env = hooked_env(tmp_path, CTRL_C_IN_EVALUATION)
    run_dir = tmp_path / "run"
    options = [*FAST_OVERRIDES, "strategy=full", f"data.root={tmp_path / 'data'}"]
    result = run_train(*options, f"hydra.run.dir={run_dir}", env=env)
    message = result.stdout + result.stderr
    found = re.search(r"Continue it with: (.+)$", message, re.MULTILINE)
    assert result.returncode == 130 and found, message[-3000:]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "failure.json").exists()
    continued = run_train(*shlex.split(found.group(1))[2:])
    record_fault(continued.returncode == 0 and (run_dir / "metrics.json").is_file())
    assert continued.returncode == 0, (continued.stdout + continued.stderr)[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["best_epoch"] == 0


def test_the_closing_line_without_checkpoints_names_the_final_weights(make_cfg, caplog):
    cfg = make_cfg(
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "trainer.enable_checkpointing=false",
    )
    with caplog.at_level("INFO", logger="finetune.run"):
        metrics = train(cfg)
    assert metrics["best_checkpoint"] == "" and metrics["best_epoch"] == 0
    assert (
        f"Final weights (no checkpoint): epoch 0; val/acc {metrics['val/acc']:.4f}" in caplog.text
    )


def test_a_resume_of_another_run_dir_uses_that_runs_config(one_epoch_run, tmp_path):
    """`ckpt_path=<run dir>` into a new run dir: the source run's config, its files untouched."""
    source = copy_run(one_epoch_run, tmp_path)
    before = file_hashes(source)
    new = tmp_path / "continued"
    result = run_train(f"ckpt_path={source}", "trainer.max_epochs=2", f"hydra.run.dir={new}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert file_hashes(source) == before
    # says what it does; Lightning's warning of the checkpoint callbacks' new folder is handled
    output = result.stdout + result.stderr
    assert f"Resuming {source} from epoch 1 (last.ckpt) into {new}" in output
    assert "dirpath has changed" not in output and "exists and is not empty" not in output
    metrics = json.loads((new / "metrics.json").read_text())
    assert (metrics["model"], metrics["epochs"]) == ("efficientnet_lite0", 2)
    assert "efficientnet_lite0" in (new / "config.yaml").read_text()


def test_a_resume_refusal_blames_what_was_typed_and_lets_the_cache_move(make_cfg, tmp_path):
    saved = OmegaConf.create(OmegaConf.to_container(make_cfg("strategy=last_layer")))
    # another strategy typed on the command line: its keys are not "added since the run"
    changes = resume_config.config_changes(saved, make_cfg("strategy=lp_ft"))
    assert changes["strategy.bn"][0] == resume_config.ABSENT
    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume_config.check_changes(changes, tmp_path, ["strategy=lp_ft"])
    message = str(caught.value)
    assert "strategy.name: 'last_layer' in the run, 'lp_ft' now" in message
    assert "made before" not in message and "defaults" not in message
    # the keys lp_ft brings that last_layer lacks: nobody typed them, so they are only counted
    assert "strategy.bn" not in message and resume_config.ABSENT not in message
    brought = [k for k, (old, _) in changes.items() if old == resume_config.ABSENT]
    assert f"(and {len(brought)} keys of the new option that the run's config lacks)" in message
    # typed by name, such a key is listed
    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume_config.check_changes(changes, tmp_path, ["strategy=lp_ft", "strategy.bn=frozen"])
    assert f"strategy.bn: {resume_config.ABSENT!r} in the run" in str(caught.value)
    # a cache folder elsewhere (FINETUNE_CACHE_DIR) changes nothing of the experiment
    moved = make_cfg("strategy=last_layer", f"paths.cache_dir={tmp_path / 'elsewhere'}")
    changes = resume_config.config_changes(saved, moved)
    assert "paths.cache_dir" in changes
    resume_config.check_changes(changes, tmp_path)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["hydra.run.dir={tmp}/gone", "ckpt_path=last"],
            "No checkpoint to resume from at {tmp}/gone",
        ),
        (["ckpt_path=last"], "ckpt_path=last resumes the run in hydra.run.dir, and none was given"),
        (["hydra.run.dir={tmp}/new", "ckpt_path={tmp}/gone.ckpt"], "at {tmp}/gone.ckpt"),
        (["hydra.run.dir={tmp}/new", "ckpt_path={tmp}/gone"], "at {tmp}/gone."),
    ],
)
def test_a_resume_of_nothing_is_refused_on_the_command_line(tmp_path, args, named):
    """It named the data instead (a download failure for the default hymenoptera) and left a
    failed run dir (config, classes, split, failure.json) where it was pointed."""
    with pytest.raises(FinetuneError) as caught:
        resume.command_line([arg.format(tmp=tmp_path) for arg in args])
    assert named.format(tmp=tmp_path) in str(caught.value)


def test_train_py_refuses_a_resume_of_nothing_before_any_run_dir_or_data(tmp_path):
    args = [f"hydra.run.dir={tmp_path}/gone", "ckpt_path=last", "paths.data_root=/nonexistent"]
    result = run_train(*args, cwd=tmp_path)
    message = result.stdout + result.stderr
    assert result.returncode == 1 and f"No checkpoint to resume from at {tmp_path}/gone" in message
    assert "Traceback" not in message and "hymenoptera" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no outputs/


def test_a_resume_may_switch_the_progress_bar_and_a_logger_off(make_cfg, tmp_path):
    """`callbacks.progress_bar=null` replaces the bar's subtree by null: the key itself changes,
    not only keys under the resumable prefix `callbacks.progress_bar.`."""
    saved = OmegaConf.create(OmegaConf.to_container(make_cfg(fast=False)))
    for off in (
        "callbacks.progress_bar=null",
        "logger=csv",
        "callbacks.progress_bar.metrics_every=5",
    ):
        changes = resume_config.config_changes(saved, make_cfg(off, fast=False))
        assert changes, off
        resume_config.check_changes(changes, tmp_path, [off])  # not refused
    changes = resume_config.config_changes(saved, make_cfg("callbacks.lr_monitor=null", fast=False))
    with pytest.raises(resume_config.ResumeRefused, match=r"callbacks\.lr_monitor"):
        resume_config.check_changes(changes, tmp_path, ["callbacks.lr_monitor=null"])


def saved_run(run_dir: Path, overrides: list[str]) -> Path:
    """A run dir as train.py leaves it for a resume's command line: .hydra/overrides.yaml, the
    resolved config.yaml, and a checkpoints/last.ckpt that exists (a missing one is refused
    first) but holds nothing: the command line refuses before it reads one."""
    (run_dir / ".hydra").mkdir(parents=True)
    text = OmegaConf.to_yaml(OmegaConf.create(overrides))
    (run_dir / ".hydra" / "overrides.yaml").write_text(text)
    cfg = check_overrides([*overrides, f"hydra.run.dir={run_dir}"])
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.run_dir = str(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").touch()
    return run_dir


def test_a_key_a_typed_override_changes_by_interpolation_is_blamed_on_it(tmp_path):
    """paths.data_root=... changes data.root (${paths.data_root}): the refusal said that the
    project's defaults had changed since the run and to pin data.root."""
    run_dir = saved_run(tmp_path / "run", ["data=synthetic", f"paths.data_root={tmp_path / 'a'}"])
    moved = f"paths.data_root={tmp_path / 'b'}"
    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume.command_line([f"hydra.run.dir={run_dir}", "ckpt_path=last", moved])
    message = str(caught.value)
    assert f"data.root: '{tmp_path / 'a'}' in the run, '{tmp_path / 'b'}' now" in message
    assert f"the overrides {moved} change" in message
    assert "defaults" not in message and "add data.root" not in message


def test_a_wrong_value_typed_on_a_resume_is_checked_against_the_runs_config(tmp_path):
    """strategy.bn=froze on a strategy=full run was explained with the default strategy's keys
    (`strategy=last_layer` has no `bn`), as if the run's own overrides had been dropped."""
    run_dir = saved_run(tmp_path / "run", ["data=synthetic", "strategy=full"])
    with pytest.raises(ConfigError) as caught:
        resume.command_line([f"hydra.run.dir={run_dir}", "ckpt_path=last", "strategy.bn=froze"])
    message = str(caught.value)
    assert "`strategy.bn=froze` is not one of: train, train_affine, frozen" in message
    assert "last_layer" not in message


def test_a_run_made_before_a_key_refused_when_absent_is_refused_naming_the_key(make_cfg, tmp_path):
    """A run's config.yaml from before strategy.augmented_views existed (its field is
    REFUSED_WHEN_ABSENT): last_layer with augmentation then trained its head by SGD, which the
    checkpoint cannot continue now."""
    cfg = make_cfg("strategy=last_layer")
    saved = OmegaConf.create(OmegaConf.to_container(cfg))  # as config.yaml reads back: untyped
    del saved.strategy["augmented_views"]
    changes = resume_config.config_changes(saved, cfg)
    assert changes == {"strategy.augmented_views": (resume_config.ABSENT, "auto")}
    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume_config.check_changes(changes, tmp_path)
    message = str(caught.value)
    assert "made before strategy.augmented_views existed" in message
    assert "add strategy.augmented_views" not in message  # no value of the run to pin
    assert "model.weights=" in message  # the way out: a new run from its weights


# --- a key added since the run ----------------------------------------------------------------


def without_key(run_dir: Path, key: str) -> None:
    """Delete the dotted `key` from the run's saved config.yaml: a run made before it existed."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    parent, _, name = key.rpartition(".")
    del OmegaConf.select(saved, parent)[name]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(saved))


def test_a_key_missing_from_the_saved_config_takes_its_default_in_one_log_line(
    make_cfg, tmp_path, caplog
):
    cfg = make_cfg("ckpt_path=last")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    without_key(run_dir, "data.skip_corrupt")
    with caplog.at_level("INFO", logger="finetune.resume_config"):
        resume_config.check_config(cfg, run_dir)
    assert [record.getMessage() for record in caplog.records] == [
        f"Resume of {run_dir}: key data.skip_corrupt was not in the run's saved config; it "
        "takes its default False"
    ]


def test_the_command_line_of_a_run_made_before_a_key_refuses_only_what_was_typed(tmp_path):
    """The key the run lacks takes its default; a refusal for another reason does not list
    it, and only a typed value other than its default is refused for it."""
    run_dir = saved_run(tmp_path / "run", ["data=synthetic", "strategy=full"])
    without_key(run_dir, "data.skip_corrupt")
    base = [f"hydra.run.dir={run_dir}", "ckpt_path=last"]

    command = resume_config.with_saved_overrides([*base, "trainer.max_epochs=5"])
    assert command.argv == [
        "data=synthetic", "strategy=full", *base, "trainer.max_epochs=5",
        "hydra.output_subdir=null",
    ]  # fmt: skip
    assert (command.source, command.checkpoint) == (run_dir, str(run_dir / "checkpoints/last.ckpt"))
    assert command.cfg.data.skip_corrupt is False
    # typed with its default: no change
    resume_config.with_saved_overrides([*base, "data.skip_corrupt=false"])

    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume_config.with_saved_overrides([*base, "seed=7"])
    message = str(caught.value)
    assert "seed: 42 in the run, 7 now" in message
    assert "skip_corrupt" not in message and "made before" not in message

    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume_config.with_saved_overrides([*base, "data.skip_corrupt=true"])
    assert 'data.skip_corrupt: "<not in the run\'s config>" in the run, True now' in str(
        caught.value
    )


def test_the_continue_command_leaves_out_a_key_the_saved_config_lacks(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=3")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(make_cfg(), resolve=True))
    without_key(run_dir, "data.skip_corrupt")
    assert interrupt.applied_overrides(cfg, run_dir) == ["trainer.max_epochs=3"]


def test_the_command_line_side_of_a_resume_imports_no_torch(tmp_path):
    """A refused resume ends before the seconds torch and Lightning take to import."""
    run_dir = saved_run(tmp_path / "run", ["data=synthetic"])
    code = (
        "import sys\n"
        "from finetune import interrupt, resume_config\n"
        f"resume_config.with_saved_overrides(['hydra.run.dir={run_dir}', 'ckpt_path=last'])\n"
        "loaded = sorted({'torch', 'pytorch_lightning', 'lightning_fabric'} & set(sys.modules))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


# --- ResumePlan -----------------------------------------------------------------------------


def run_with_checkpoint(cfg, hparams: dict, epochs: int = 1) -> Path:
    """`cfg`'s run dir with its config.yaml and a checkpoints/last.ckpt of `epochs` epochs
    trained with `hparams`, as Lightning writes the keys the checks read."""
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    progress = {"fit_loop": {"epoch_progress": {"current": {"processed": epochs}}}}
    checkpoint = {"hyper_parameters": hparams, "loops": progress, "epoch": epochs - 1}
    torch.save(checkpoint, run_dir / "checkpoints" / "last.ckpt")
    return run_dir


class Data:
    """What `ResumePlan.verify` reads of a data module."""

    def __init__(self, class_names: list[str], class_weight: list[float] | None = None) -> None:
        self.class_names = class_names
        self.class_weight = class_weight

    def split_record(self) -> dict:
        return {"files": {}}


CLASSES = ["a", "b", "c"]
HPARAMS = {
    "class_names": CLASSES,
    "model": {"name": "efficientnet_lite0"},
    "optim": {"optimizer": {"lr": 0.01}},
}


def test_a_run_that_resumes_nothing_plans_a_fresh_fit(make_cfg):
    cfg = make_cfg()
    plan = resume.ResumePlan.of(cfg, Path(cfg.run_dir))
    assert (plan.checkpoint, plan.in_place, plan.restores_head) == (None, False, False)
    assert plan.silenced_warnings == ()
    plan.verify(cfg, {}, Data(["other"]), "probe")  # nothing to compare with
    with pytest.raises(FinetuneError) as caught, plan.kept_as_it_was():
        raise FinetuneError("no data")
    assert type(caught.value) is FinetuneError  # a new run's failure is not a refused resume


def test_a_resume_in_place_plans_its_checkpoint_and_keeps_the_run_dir(make_cfg):
    cfg = make_cfg("ckpt_path=last", "trainer.max_epochs=2")
    run_dir = run_with_checkpoint(cfg, HPARAMS)
    plan = resume.ResumePlan.of(cfg, run_dir)
    assert plan.checkpoint == str(run_dir / "checkpoints" / "last.ckpt")
    assert plan.in_place and plan.restores_head
    assert plan.silenced_warnings == resume.RESUME_WARNINGS
    plan.verify(cfg, {}, Data(CLASSES), "finetune")
    refused = pytest.raises(
        resume_config.ResumeRefused, match=r"no data\. \(The run dir .* as it was"
    )
    with refused, plan.kept_as_it_was():
        raise FinetuneError("no data.")


def test_a_resume_into_another_run_dir_is_not_in_place(make_cfg, tmp_path):
    source = run_with_checkpoint(make_cfg("trainer.max_epochs=2"), HPARAMS)
    cfg = make_cfg(f"ckpt_path={source}", "trainer.max_epochs=2")
    plan = resume.ResumePlan.of(cfg, tmp_path / "new")
    assert plan.checkpoint == str(source / "checkpoints" / "last.ckpt") and not plan.in_place
    with pytest.raises(FinetuneError) as caught, plan.kept_as_it_was():
        raise FinetuneError("no data")
    assert type(caught.value) is FinetuneError


def test_a_resume_plan_refuses_before_anything_is_verified(make_cfg):
    cfg = make_cfg("ckpt_path=last")
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    with pytest.raises(resume_config.ResumeRefused, match=r"No checkpoint to resume.*as it was"):
        resume.ResumePlan.of(cfg, run_dir)  # in place: refused, not a failed run
    torch.save({}, run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(resume_config.ResumeRefused, match="seed: 42 in the run, 7 now"):
        resume.ResumePlan.of(make_cfg("ckpt_path=last", "seed=7"), run_dir)


@pytest.mark.parametrize(
    ("options", "chosen", "classes", "regime", "refusal"),
    [
        ([], {}, ["a", "b"], "finetune", "trained for 3 classes"),
        (["model=resnet18"], {}, CLASSES, "finetune", "holds a efficientnet_lite0"),
        (["optim.optimizer.lr=0.04"], {"optim.optimizer.lr": {}}, CLASSES, "finetune",
         "lr=0.04: the run trained at 0.01"),
        (["trainer.max_epochs=1"], {}, CLASSES, "finetune", "has trained 1 epoch"),
        (["trainer.max_epochs=1"], {}, CLASSES, "probe", "linear probe solved on cached"),
    ],
)  # fmt: skip
def test_a_resume_plan_verifies_the_checkpoint(make_cfg, options, chosen, classes, regime, refusal):
    run_dir = run_with_checkpoint(make_cfg(), HPARAMS)
    (run_dir / "metrics.json").write_text("{}")  # finished: its last epoch is not left to end
    cfg = make_cfg("ckpt_path=last", "trainer.max_epochs=2", *options)
    plan = resume.ResumePlan(run_dir, "last", str(run_dir / "checkpoints" / "last.ckpt"), True)
    with pytest.raises(FinetuneError, match=refusal):
        plan.verify(cfg, chosen, Data(classes), regime)
    # the lr the user typed is theirs: only a rate lr=auto chose is compared
    if chosen:
        plan.verify(cfg, {}, Data(classes), regime)


def test_a_resume_plan_refuses_a_checkpoint_trained_with_other_class_weights(make_cfg, tmp_path):
    """The checkpoint's hyper-parameters say how its loss weighed the classes (none: alike);
    a resume from the file alone, which no saved config guards, is refused when they differ."""
    run_dir = run_with_checkpoint(make_cfg(), HPARAMS | {"class_weight": [1.0, 2.0, 1.0]})
    cfg = make_cfg("ckpt_path=last", "trainer.max_epochs=2")
    plan = resume.ResumePlan(run_dir, "last", str(run_dir / "checkpoints" / "last.ckpt"), True)
    plan.verify(cfg, {}, Data(CLASSES, [1.0, 2.0, 1.0]), "finetune")  # the same: resumes
    for other in (None, [1.0, 1.0, 2.0]):
        with pytest.raises(FinetuneError, match=r"weighed the classes \[1.0, 2.0, 1.0\]"):
            plan.verify(cfg, {}, Data(CLASSES, other), "finetune")
    # a checkpoint of a version without class weights trained them alike
    older = make_cfg()
    older.run_dir = str(tmp_path / "older")
    unweighted = run_with_checkpoint(older, HPARAMS)
    plan = resume.ResumePlan(
        unweighted, "last", str(unweighted / "checkpoints" / "last.ckpt"), True
    )
    plan.verify(cfg, {}, Data(CLASSES, [1.0, 1.0, 1.0]), "finetune")
    with pytest.raises(FinetuneError, match="weighed the classes alike"):
        plan.verify(cfg, {}, Data(CLASSES, [1.0, 2.0, 1.0]), "finetune")


@pytest.mark.slow  # two trainings: CI's slow step
def test_the_final_numbers_of_a_resumed_run_sit_at_its_last_step_in_tensorboard(make_cfg, tmp_path):
    # Both processes log final/*; a point at step 0 for each left two values at one step, and
    # TensorBoard's chart showed whichever it read first
    train(make_cfg("strategy=full", "trainer.max_epochs=1"))
    metrics = train(make_cfg("strategy=full", "trainer.max_epochs=2", "ckpt_path=last"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    points = events.Scalars("final/val_acc")
    assert len(points) == 2
    assert points[0].step < points[1].step
    assert points[1].value == pytest.approx(metrics["val/acc"])


@pytest.mark.slow  # four trainings
@pytest.mark.parametrize(
    ("options", "extracts_on_resume"),
    [
        (["strategy=lp_ft"], False),  # the checkpoint holds the solved head
        (["strategy=last_layer", "strategy.head_init=random", "augment=none"], True),
    ],
)
def test_a_resumed_run_reports_the_feature_cache_of_the_run_it_continues(
    make_cfg, monkeypatch, tmp_path, options, extracts_on_resume
):
    features.clear_memory_cache()  # no other test's features, in memory or on disk
    options = [*options, f"paths.cache_dir={tmp_path / 'cache'}"]
    first = train(make_cfg(*options, "trainer.max_epochs=1"))
    assert first["feature_cache"] == "miss"
    calls = []
    extract = features.cached_features
    monkeypatch.setattr(
        features, "cached_features", lambda *a, **k: calls.append(1) or extract(*a, **k)
    )
    resumed = train(make_cfg(*options, "trainer.max_epochs=2", "ckpt_path=last"))
    assert bool(calls) is extracts_on_resume
    keys = ("feature_cache", "feature_cache_file", "feature_cache_seconds")
    assert {k: resumed[k] for k in keys} == {k: first[k] for k in keys}


def test_resuming_a_run_that_failed_before_its_first_checkpoint_says_so_whatever_the_overrides(
    tmp_path,
):
    """The resume of a run that failed on its weights must not blame the new overrides
    ("Cannot resume ... model.weights ...") nor offer a last.ckpt that does not exist as the
    weights of a new run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # a folder that existed keeps the failure (a new one is removed)
    options = ["data=synthetic", f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]
    failed = run_train(*options, "model=efficientnet_lite0", "model.weights=/nonexistent/w.pth")
    assert failed.returncode == 1 and (run_dir / "failure.json").is_file()
    resumed = run_train(
        *options, "model=efficientnet_lite0", "model.weights=DEFAULT", "ckpt_path=last"
    )
    assert resumed.returncode == 1
    assert "No checkpoint to resume from" in resumed.stderr and "failed before" in resumed.stderr
    assert "Cannot resume" not in resumed.stderr
    again = run_train(
        *options, "model=efficientnet_lite0", "--cfg", "job"
    )  # the folder may be reused
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_refused_resume_blames_only_the_overrides_that_change_something(tmp_path):
    """Saved overrides typed again as they were are no cause of a refusal."""
    run_dir = saved_run(tmp_path / "run", ["data=synthetic", "strategy=full"])
    base = [f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume_config.with_saved_overrides(["data=synthetic", "strategy=full", *base, "seed=7"])
    assert "(the overrides seed=7 change)" in str(caught.value)


def test_lightnings_dirpath_warning_is_silenced_for_every_restore_not_only_the_fit(make_cfg):
    """The evaluation after a resume into a new run dir restores the callbacks from a best
    checkpoint the earlier process wrote (another dirpath): its warning would only alarm."""
    import warnings

    from finetune import runtime

    runtime.prepare(make_cfg())
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("The dirpath has changed from 'a' to 'b', therefore ...", stacklevel=1)
        warnings.warn("another warning", stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]
