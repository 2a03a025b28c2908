"""Each private Lightning name `finetune.lightning_internals` uses, and what the project relies
on it doing, on a real `Trainer` with a tiny module: a Lightning release that renames or changes
one fails here, not in a training run."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from finetune.lightning_internals import (
    CheckpointWithSaveHook,
    UnrepeatedDistributedSampler,
    epochs_processed,
    epochs_processed_in_checkpoint,
    rebuild_training_loader,
    run_validation_now,
    save_checkpoint_file,
)

BATCHES = 2  # training and validation batches of the tiny module


class TinyModule(pl.LightningModule):
    """A linear layer on 4 random features; counts its loader requests and validation steps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.train_loaders_made = 0
        self.validation_steps = 0

    def _loader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(4 * BATCHES, 4, generator=generator)
        labels = torch.randint(0, 2, (4 * BATCHES,), generator=generator)
        return DataLoader(TensorDataset(features, labels), batch_size=4)

    def train_dataloader(self) -> DataLoader:
        self.train_loaders_made += 1
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        features, labels = batch
        return torch.nn.functional.cross_entropy(self.layer(features), labels)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch, batch_idx: int) -> None:
        self.validation_steps += 1
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(root: Path, max_epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


class Recorder(pl.Callback):
    """`epochs_processed` where the project reads it: at the start of training and of each
    epoch."""

    def __init__(self) -> None:
        self.at_train_start: int | None = None
        self.at_epoch_starts: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_train_start = epochs_processed(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_epoch_starts.append(epochs_processed(trainer))


def test_epochs_processed_counts_epochs_and_a_resume_restores_it_before_training(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, 2, [recorder])
    trainer.fit(TinyModule())
    assert (recorder.at_train_start, recorder.at_epoch_starts) == (0, [0, 1])
    assert epochs_processed(trainer) == 2
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)
    assert epochs_processed_in_checkpoint(saved) == 2
    assert epochs_processed_in_checkpoint({"epoch": 4}) == 5
    assert epochs_processed_in_checkpoint({}) == 0

    resumed = Recorder()
    make_trainer(tmp_path, 3, [resumed]).fit(TinyModule(), ckpt_path=tmp_path / "two.ckpt")
    assert (resumed.at_train_start, resumed.at_epoch_starts) == (2, [2])


class Rebuilder(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rebuild_training_loader(trainer)


def test_rebuild_training_loader_requests_the_loader_again_for_the_first_epoch(tmp_path):
    assert "_combined_loader" in vars(pl.Trainer().fit_loop)
    plain = TinyModule()
    make_trainer(tmp_path, 1, []).fit(plain)
    assert plain.train_loaders_made == 1
    rebuilt = TinyModule()
    trainer = make_trainer(tmp_path, 2, [Rebuilder()])
    trainer.fit(rebuilt)
    # once at setup, once more at the first epoch's start; the second epoch keeps it
    assert rebuilt.train_loaders_made == 2
    assert trainer.global_step == 2 * BATCHES


class EarlyValidation(pl.Callback):
    def __init__(self) -> None:
        self.steps_after = -1
        self.metrics_after: dict[str, float] = {}
        self.states_after: tuple[bool, bool] = (False, True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_validation_now(trainer)
        self.steps_after = pl_module.validation_steps
        self.metrics_after = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.states_after = (trainer.training, trainer.validating)


def test_run_validation_now_runs_the_fits_validation_loop_and_returns_to_training(tmp_path):
    early = EarlyValidation()
    module = TinyModule()
    trainer = make_trainer(tmp_path, 1, [early])
    trainer.fit(module)
    assert early.steps_after == BATCHES
    assert set(early.metrics_after) == {"val/loss"}
    assert early.states_after == (True, False)
    # and the epoch's own validation still runs after it
    assert module.validation_steps == 2 * BATCHES
    assert trainer.global_step == BATCHES


class HookRecorder(CheckpointWithSaveHook):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, bool, bool]] = []

    def before_save(self, trainer: pl.Trainer, filepath: str) -> None:
        self.seen.append((filepath, filepath in self.best_k_models, os.path.exists(filepath)))


def test_the_save_hook_sees_the_kept_set_before_the_file_is_written(tmp_path):
    parameters = list(inspect.signature(ModelCheckpoint._save_checkpoint).parameters)
    assert parameters == ["self", "trainer", "filepath"]
    keeper = HookRecorder(dirpath=tmp_path / "kept", monitor="val/loss", save_top_k=-1)
    make_trainer(tmp_path, 2, [keeper]).fit(TinyModule())
    assert len(keeper.seen) == 2
    for path, kept, existed in keeper.seen:
        assert kept and not existed and Path(path).is_file()


def test_save_checkpoint_file_writes_a_checkpoint_that_is_not_the_last_saved(tmp_path):
    keeper = ModelCheckpoint(dirpath=tmp_path / "kept", monitor="val/loss", save_top_k=1)
    trainer = make_trainer(tmp_path, 1, [keeper])
    trainer.fit(TinyModule())
    # the attribute `save_last="link"` links to: the epoch's checkpoint
    last_saved = keeper._last_checkpoint_saved
    assert last_saved == keeper.best_model_path and Path(last_saved).is_file()
    extra = str(tmp_path / "kept" / "extra.ckpt")
    save_checkpoint_file(keeper, trainer, extra)
    assert keeper._last_checkpoint_saved == last_saved
    saved = torch.load(extra, weights_only=True)
    assert torch.equal(saved["state_dict"]["layer.weight"], trainer.model.layer.weight)


def test_unrepeated_sampler_gives_each_process_its_positions_without_padding():
    shares = [
        list(UnrepeatedDistributedSampler(range(5), num_replicas=2, rank=rank, shuffle=False))
        for rank in (0, 1)
    ]
    assert shares == [[0, 2, 4], [1, 3]]
