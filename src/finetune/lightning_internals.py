"""Every use of Lightning's private or undocumented API, each behind one named function.

Lightning's loops, `ModelCheckpoint`'s save step and the distributed-sampler override are not
part of its public API and may change in any release. The rest of the project calls these
functions instead, so that such a change is met in this module alone; `tests/
test_lightning_internals.py` checks each private name and its behaviour on a real `Trainer`,
so that it fails on the release that changes them (checked on pytorch_lightning 2.6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

__all__ = [
    "CheckpointWithSaveHook",
    "UnrepeatedDistributedSampler",
    "epochs_processed",
    "epochs_processed_in_checkpoint",
    "rebuild_training_loader",
    "run_validation_now",
    "save_checkpoint_file",
]


def epochs_processed(trainer: pl.Trainer) -> int:
    """The training epochs the fit loop has processed: the epoch it passes to the training
    sampler's `set_epoch` next. After a resume it is the checkpoint's count, restored before
    `on_train_start` (unlike `trainer.current_epoch`, which counts completed epochs)."""
    return int(trainer.fit_loop.epoch_progress.current.processed)


def epochs_processed_in_checkpoint(checkpoint: Mapping[str, Any]) -> int:
    """`epochs_processed` as a saved checkpoint (the dict `torch.load` gives) holds it: what a
    resume from it restores. A checkpoint without fit-loop state counts its `epoch` + 1 (0
    when it has neither)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", checkpoint.get("epoch", -1) + 1))


def rebuild_training_loader(trainer: pl.Trainer) -> None:
    """Make the fit loop request the training loader from the data module again (with a new
    iterator) at the start of the next epoch: `FitLoop.setup_data` rebuilds the loader, its
    fetcher and its iterator when it holds none. Called from `on_train_start`."""
    trainer.fit_loop._combined_loader = None


def run_validation_now(trainer: pl.Trainer) -> None:
    """Run the fit's own validation loop once, now (from `on_train_start`): its metrics,
    logging, precision, `limit_val_batches` and processes, as the training epoch loop runs it
    between epochs. The trainer is back in its training state afterwards; the validation loop
    leaves the whole LightningModule in train mode."""
    trainer.validating = True  # as the training epoch loop sets it before its validation
    trainer.fit_loop.epoch_loop.val_loop.run()
    trainer.training = True


class CheckpointWithSaveHook(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` with a hook, `before_save(trainer, filepath)`, called
    after the kept set (`best_k_models`) holds the new checkpoint and before its file (with
    this callback's state) is written: the place to re-rank the kept set."""

    def before_save(self, trainer: pl.Trainer, filepath: str) -> None:
        """Nothing here; a subclass changes its state before it is saved."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.before_save(trainer, filepath)
        super()._save_checkpoint(trainer, filepath)


def save_checkpoint_file(checkpoint: ModelCheckpoint, trainer: pl.Trainer, filepath: str) -> None:
    """Write the trainer's checkpoint to `filepath` as `checkpoint` writes its kept ones
    (`ModelCheckpoint`'s own save, without a subclass's `before_save`), without making it the
    last checkpoint saved: `save_last="link"` still links to the latest epoch's."""
    last_saved = checkpoint._last_checkpoint_saved
    ModelCheckpoint._save_checkpoint(checkpoint, trainer, filepath)
    checkpoint._last_checkpoint_saved = last_saved
