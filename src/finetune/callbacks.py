"""Lightning callbacks of a run that are not a freeze strategy, a report or resume state:
the best-checkpoint keeper, the epoch timer and the progress bar, and the instantiation of the
config's callback and logger groups (`conf/callbacks/*.yaml`, `conf/logger/*.yaml`)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.utilities.rank_zero import rank_zero_only  # rank set by Lightning

from finetune.atomic import atomic_write
from finetune.lightning_internals import CheckpointWithSaveHook, save_checkpoint_file

log = logging.getLogger(__name__)


def instantiate_all(group_cfg: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a callbacks/logger group, in order; a null entry switches it
    off (`callbacks.progress_bar=null`). An empty or missing group gives an empty list."""
    if not group_cfg:
        return []
    return [instantiate(entry) for entry in group_cfg.values() if entry is not None]


class BestCheckpoint(CheckpointWithSaveHook):
    """Lightning's `ModelCheckpoint`, where a tie of the monitored metric is broken by a second
    one: with `monitor: val/acc` and `tie_breaker: val/loss` (`tie_mode: min`), of two epochs
    at the same accuracy the one with the lower validation loss is kept and is the best. (The
    stock callback keeps the earlier epoch on a tie: on a small validation set accuracy often
    stops moving while the loss still falls.) The tie-breaker values of the kept checkpoints
    are saved in its state, so a resumed run ranks them the same way.
    """

    def __init__(self, *args: Any, tie_breaker: str = "val/loss", tie_mode: str = "min", **kwargs):
        super().__init__(*args, **kwargs)
        if tie_mode not in ("min", "max"):
            raise ValueError(f"tie_mode must be min or max, not {tie_mode!r}")
        self.tie_breaker = tie_breaker
        self.tie_mode = tie_mode
        self.tie_values: dict[str, float] = {}  # kept checkpoint path -> its tie-breaker value

    @property
    def state_key(self) -> str:
        # The stock callback's key: checkpoints written before this class existed restore it.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def _tie_value(self, trainer: pl.Trainer) -> float:
        value = trainer.callback_metrics.get(self.tie_breaker)
        return float(value) if value is not None else math.nan

    def _rank(self, path: str) -> tuple[float, float]:
        """Larger is better: (monitored metric, tie-breaker), each turned so; NaN is worst."""
        score = float(self.best_k_models[path])
        tie = self.tie_values.get(path, math.nan)
        score = score if self.mode == "max" else -score
        tie = tie if self.tie_mode == "max" else -tie
        return (-math.inf if math.isnan(score) else score, -math.inf if math.isnan(tie) else tie)

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if super().check_monitor_top_k(trainer, current):
            return True
        if current is None or not self.kth_best_model_path:
            return False
        kth = self.kth_best_model_path
        tie = float(current) == float(self.best_k_models[kth])
        if tie:
            new = self._tie_value(trainer)
            old = self.tie_values.get(kth, math.nan)
            better = new < old if self.tie_mode == "min" else new > old
            tie = not math.isnan(new) and (math.isnan(old) or better)
        return trainer.strategy.reduce_boolean_decision(tie)

    def before_save(self, trainer: pl.Trainer, filepath: str) -> None:
        # The kept set holds the new checkpoint; rank it with the tie-breaker.
        if self.monitor and filepath in self.best_k_models:
            self.tie_values = {p: v for p, v in self.tie_values.items() if p in self.best_k_models}
            self.tie_values[filepath] = self._tie_value(trainer)
            ranked = sorted(self.best_k_models, key=self._rank)
            if len(ranked) == self.save_top_k:
                self.kth_best_model_path = ranked[0]
                self.kth_value = self.best_k_models[ranked[0]]
            self.best_model_path = ranked[-1]
            self.best_model_score = self.best_k_models[ranked[-1]]

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"tie_values": dict(self.tie_values)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath", self.dirpath)
        if saved_dir and self.dirpath and saved_dir != self.dirpath:
            # The stock callback would forget the kept checkpoints (and keep the old best
            # path), so an epoch worse than the run's best would become the resumed run's best.
            # A run dir that was moved or copied: they are in this dirpath now. A resume into
            # a new run dir: they are copied here, so that this run holds its best and never
            # deletes a file of the run it continues.
            if bring_kept_checkpoints(state_dict, saved_dir, self.dirpath):
                state_dict = moved_state(state_dict, saved_dir, self.dirpath)
            else:
                state_dict = forgotten_state(state_dict, self.dirpath)
        super().load_state_dict(state_dict)
        self.tie_values = dict(state_dict.get("tie_values") or {})


def bring_kept_checkpoints(state: dict[str, Any], old_dir: str, new_dir: str) -> bool:
    """Whether every checkpoint a `ModelCheckpoint` state keeps (`best_k_models`) is in
    `new_dir` at its place under `old_dir`, after copying there (on rank 0) those still only
    in `old_dir`. False when one is in neither: the ranking cannot be continued."""
    for path in state.get("best_k_models") or {}:
        moved = Path(new_dir) / os.path.relpath(path, old_dir)
        if moved.is_file():
            continue
        if not Path(path).is_file() or os.path.relpath(path, old_dir).startswith(".."):
            log.warning(
                "The checkpoint %s that the run kept as its best is gone: the resumed run ranks "
                "its epochs afresh.",
                path,
            )
            return False
        if rank_zero_only.rank == 0:
            moved.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(moved, lambda out, source=path: _copy_into(source, out))
    return True


def _copy_into(source: str, out: IO[bytes]) -> None:
    with open(source, "rb") as file:
        shutil.copyfileobj(file, out)


def forgotten_state(state: dict[str, Any], new_dir: str) -> dict[str, Any]:
    """A `ModelCheckpoint` state that keeps no checkpoint, in `new_dir` (what the stock
    callback loads when its dirpath changed, without the old best path)."""
    kept = ("best_k_models", "tie_values", "kth_best_model_path", "kth_value")
    forgotten = {k: v for k, v in state.items() if k not in kept} | {"dirpath": new_dir}
    return forgotten | {"best_model_path": "", "best_model_score": None, "last_model_path": ""}


def moved_state(state: dict[str, Any], old_dir: str, new_dir: str) -> dict[str, Any]:
    """A `ModelCheckpoint` state with each path under `old_dir` (best, kth, last, the kept
    checkpoints, `BestCheckpoint`'s tie values) moved to the same place under `new_dir`."""

    def move(path: Any) -> Any:
        if not isinstance(path, str) or not path:
            return path
        relative = os.path.relpath(path, old_dir)
        return path if relative.startswith("..") else os.path.join(new_dir, relative)

    moved = dict(state, dirpath=new_dir)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            moved[key] = move(state[key])
    for key in ("best_k_models", "tie_values"):
        if isinstance(state.get(key), dict):
            moved[key] = {move(path): value for path, value in state[key].items()}
    return moved


def keep_as_candidate(
    checkpoint: ModelCheckpoint, trainer: pl.Trainer, name: str, metrics: dict[str, float]
) -> str | None:
    """Save the weights in memory, before any training step, as a checkpoint that `checkpoint`
    keeps and ranks by `metrics` (its monitored value and, for a `BestCheckpoint`, its
    tie-breaker): an epoch replaces it, deleting its file, only by beating it as it would beat
    an earlier epoch. The file is `<name>-<monitor><value>.ckpt` in the callback's dirpath.

    Returns that path, or None (nothing written) when the callback monitors nothing `metrics`
    holds, keeps no checkpoint (`save_top_k=0`) or keeps some already (a resumed run).
    """
    monitor = checkpoint.monitor
    if not monitor or monitor not in metrics or checkpoint.save_top_k == 0:
        return None
    if checkpoint.best_k_models or checkpoint.dirpath is None:
        return None
    value = float(metrics[monitor])
    filename = f"{name}-{monitor.replace('/', '_')}{value:.4f}{checkpoint.FILE_EXTENSION}"
    filepath = os.path.join(checkpoint.dirpath, filename)
    score = torch.tensor(value)
    # ModelCheckpoint's own bookkeeping of a first kept checkpoint (_update_best_and_save)
    checkpoint.best_k_models = {filepath: score}
    if checkpoint.save_top_k == 1:
        checkpoint.kth_best_model_path, checkpoint.kth_value = filepath, score
    checkpoint.best_model_path, checkpoint.best_model_score = filepath, score
    if isinstance(checkpoint, BestCheckpoint):
        checkpoint.tie_values = {filepath: float(metrics.get(checkpoint.tie_breaker, math.nan))}
    # The stock save (BestCheckpoint's would take its tie-breaker from the trainer's metrics
    # again). It is not the last checkpoint an epoch saved: save_last must not link to it.
    save_checkpoint_file(checkpoint, trainer, filepath)
    return filepath


class EpochTimer(pl.Callback):
    """Seconds of each training epoch (`seconds`, a list of floats rounded to ms) and of the
    whole fit (`fit_seconds()`, from `start_fit()`: feature extraction and the probe's solve
    included), for metrics.json and the benchmarks. Lightning runs the epoch's validation
    inside the training epoch; its time is subtracted from the epoch's. Both are kept in every
    checkpoint (`state_dict`), so a resumed run lists every epoch and counts the fit seconds
    of the processes before it (up to the checkpoint it continues from), as the uninterrupted
    run would, not only those since the resume."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        # fit seconds of the processes before a resume, up to its checkpoint's save
        self.earlier_fit_seconds = 0.0
        self._fit_started: float | None = None  # None: start_fit not called
        self._started: float | None = None  # None: between epochs
        self._validation_started = 0.0
        self._validation_seconds = 0.0

    def start_fit(self) -> None:
        """Start this process's fit clock (before the features are extracted)."""
        self._fit_started = time.perf_counter()

    def fit_seconds(self) -> float:
        """Seconds of fit so far: this process's since `start_fit` and the earlier ones'."""
        now = 0.0 if self._fit_started is None else time.perf_counter() - self._fit_started
        return self.earlier_fit_seconds + now

    def state_dict(self) -> dict[str, Any]:
        # Lightning saves the epoch's checkpoint at the end of its validation, before
        # on_train_epoch_end: the epoch in progress is counted up to now.
        seconds = list(self.seconds)
        if self._started is not None:
            elapsed = time.perf_counter() - self._started - self._validation_seconds
            seconds.append(round(elapsed, 3))
        return {"seconds": seconds, "fit_seconds": round(self.fit_seconds(), 3)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = list(state_dict.get("seconds", []))
        # checkpoints of earlier versions kept no fit seconds: this process's alone are counted
        self.earlier_fit_seconds = float(state_dict.get("fit_seconds", 0.0))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._validation_seconds = 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_seconds += time.perf_counter() - self._validation_started

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = time.perf_counter() - (self._started or 0.0) - self._validation_seconds
        self.seconds.append(round(elapsed, 3))
        self._started = None


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
