"""Lightning callbacks of a run that are not a freeze strategy, a report or resume state:
the epoch timer and the progress bar, and the instantiation of the config's callback and
logger groups (`conf/callbacks/*.yaml`, `conf/logger/*.yaml`)."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import RichProgressBar


def instantiate_all(group_cfg: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a callbacks/logger group, in order; a null entry switches it
    off (`callbacks.progress_bar=null`). An empty or missing group gives an empty list."""
    if not group_cfg:
        return []
    return [instantiate(entry) for entry in group_cfg.values() if entry is not None]


class EpochTimer(pl.Callback):
    """Seconds of each training epoch (`seconds`, a list of floats rounded to ms), for
    metrics.json and the benchmarks. Lightning runs the epoch's validation inside the training
    epoch; its time is subtracted."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0
        self._validation_started = 0.0
        self._validation_seconds = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._validation_seconds = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_seconds += time.perf_counter() - self._validation_started

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - self._started - self._validation_seconds
        self.seconds.append(round(elapsed, 3))


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading the logged numbers (the training loss) every
    `metrics_every` training batches and at the epoch's last one, not after every batch. Each
    read copies a value back from the GPU: the CPU waits for the step to finish and the GPU
    then idles until the next step is queued. The bar itself still moves every batch.

    `shown` holds the numbers the bar displays now (name -> value).
    """

    def __init__(self, metrics_every: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_every = max(int(metrics_every), 1)
        self.shown: dict[str, Any] = {}
        self._read_now = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        done = batch_idx + 1
        self._read_now = done % self.metrics_every == 0 or done >= trainer.num_training_batches
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._read_now = True  # validation and epoch ends read as usual

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        if self._read_now or not self.shown:
            self.shown = super().get_metrics(trainer, pl_module)
        return self.shown
