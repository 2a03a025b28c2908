"""Resuming from a checkpoint: files a kill cannot corrupt, random state that survives, the
checks that need the checkpoint, and `ResumePlan`, what the training flow asks of a resume.

- `AtomicCheckpointIO` writes every checkpoint with `finetune.atomic.atomic_write`, so a
  kill (or a full disk) during a write never replaces the last good checkpoint.
- `RandomState` saves the global random number generators (torch, CUDA, numpy, python) in each
  checkpoint and restores them on resume. The data loaders draw nothing from them (their order
  and augmentation are seeded by epoch and index, see `finetune.data.EpochSampler`), so a
  resumed run continues with exactly the random numbers an uninterrupted run would have used.
- `check_compatible` refuses a checkpoint of another experiment (other classes, another model)
  with a message that points to the weights-loading path (`model.weights=...`) instead; refused
  too: a config asking for no epoch beyond those trained (`check_epochs`), and data whose
  splits are not the run's split.json (`check_split`).
- `command_line` is `finetune.resume_config.with_saved_overrides` (the run's own config, the
  changes a resume refuses; no torch) with the epochs check, which reads the checkpoint.
- A resume in place rewrites none of the run's files (config, .hydra/, classes): a refused or
  failed resume leaves the run dir as it was (`ResumeRefused`). What Ctrl-C prints:
  `finetune.interrupt`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig

from finetune import lightning_internals, strategies
from finetune.atomic import DiskFullError, atomic_write
from finetune.data import FinetuneDataModule
from finetune.errors import FinetuneError
from finetune.resume_config import (
    ResumeRefused,
    check_config,
    is_in_place,
    resolve_checkpoint,
    source_run_dir,
    with_saved_overrides,
)
from finetune.rundir import METRICS_FILE, SPLIT_FILE

log = logging.getLogger(__name__)

# Lightning's warnings that a resume makes true and harmless: it finds its own checkpoints
# there; BestCheckpoint moves or copies its kept ones (the stock last-checkpoint callback
# rewrites last.ckpt each epoch).
RESUME_WARNINGS = (r"Checkpoint directory .* exists and is not empty", r"The dirpath has changed")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint written with `finetune.atomic.atomic_write`: beside the target, then
    renamed over it. A full disk or unwritable folder is a `FinetuneError` naming the fix."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        try:
            atomic_write(path, lambda handle: torch.save(checkpoint, handle))
        except (OSError, DiskFullError) as error:
            full = isinstance(error, DiskFullError) or error.errno == errno.ENOSPC
            reason = "the disk is full" if full else f"{error.strerror}: {error}"
            raise FinetuneError(
                f"Could not write the checkpoint {path} ({reason}). The checkpoints written "
                f"before are intact in {path.parent}. Fix: free space or make the run dir "
                f"writable, then {how_to_continue(path.parent)}"
            ) from error


def how_to_continue(checkpoints: Path) -> str:
    """How to continue a run whose checkpoints lie in `checkpoints` (its run dir's
    checkpoints/): from last.ckpt, else from the newest checkpoint there, else from the start."""
    run_dir = checkpoints.parent
    if (checkpoints / "last.ckpt").is_file():
        return f"resume with hydra.run.dir={run_dir} ckpt_path=last."
    written = sorted(checkpoints.glob("*.ckpt"), key=lambda file: file.stat().st_mtime)
    if written:
        return f"resume with hydra.run.dir={run_dir} 'ckpt_path={written[-1]}'."
    return "run the same command again."


class RandomState(pl.Callback):
    """Global RNG states in every checkpoint, restored when a run resumes from it."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            # plain types and tensors only: checkpoints load with weights_only=True
            "numpy": [kind, torch.from_numpy(keys.copy()), position, has_gauss, cached_gaussian],
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy(), position, has_gauss, cached_gaussian))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ResumedDataOrder(pl.Callback):
    """A resumed run's first epoch draws that epoch's data order and augmentation, not epoch
    0's. Lightning creates the training iterator while `configure_optimizers` estimates the
    steps (`trainer.estimated_stepping_batches`), before it restores the loops from the
    checkpoint and before it calls the sampler's `set_epoch`; with worker processes that
    iterator has already drawn epoch 0's first keys (Lightning issue #21938). On a resume the
    training loader is therefore made again at the start of the first epoch, after the
    restore, where the data module's sampler starts at the restored epoch."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if lightning_internals.epochs_processed(trainer) > 0:
            lightning_internals.rebuild_training_loader(trainer)


def check_compatible(
    checkpoint_path: str,
    class_names: list[str],
    model_name: str,
    auto_lr: float | None = None,
    class_weight: list[float] | None = None,
) -> None:
    """Refuse to resume from a checkpoint of a different experiment, before Lightning fails with
    a wall of size-mismatch errors, or of another loss (`class_weight`, data.class_weights'
    per class; a checkpoint of a version without it trained unweighted); and (`ResumeRefused`)
    at `auto_lr`, the rate lr=auto chose for this resume, when the checkpoint trained at
    another (`check_learning_rate`)."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, not a checkpoint, pickled code...
        raise FinetuneError(
            f"Cannot read the checkpoint {checkpoint_path} ({type(error).__name__}: {error}). "
            "Fix: resume from another checkpoint (checkpoints/last.ckpt or the best one)."
        ) from error
    hparams = checkpoint.get("hyper_parameters") or {}
    saved_classes = list(hparams.get("class_names") or [])
    saved_model = (hparams.get("model") or {}).get("name")
    problems = []
    if saved_model and saved_model != model_name:
        problems.append(f"it holds a {saved_model}, this run builds a {model_name}")
    if saved_classes and saved_classes != list(class_names):
        problems.append(
            f"it was trained for {len(saved_classes)} classes ({', '.join(saved_classes[:5])}"
            f"{'...' if len(saved_classes) > 5 else ''}), this run has {len(class_names)} "
            f"({', '.join(class_names[:5])}{'...' if len(class_names) > 5 else ''})"
        )
    trained_weight = hparams.get("class_weight")
    if not _same_weights(trained_weight, class_weight):
        problems.append(
            f"its loss weighed the classes {trained_weight or 'alike'}, this run's "
            f"{class_weight or 'alike'} (data.class_weights)"
        )
    if problems:
        raise FinetuneError(
            f"Cannot resume from {checkpoint_path}: {'; '.join(problems)}. ckpt_path continues "
            "the same experiment. Fix: to start a new run from those weights, use "
            f"model.weights={checkpoint_path} (loaded bottom-up: every layer that fits, up to "
            "the first that does not), or resume with the original model and data."
        )
    if auto_lr is not None:
        check_learning_rate(hparams, auto_lr, checkpoint_path)


def _same_weights(first: list[float] | None, second: list[float] | None) -> bool:
    """Whether two class-weight lists (None: every class weighs 1) weigh the classes alike."""
    count = len(first or second or [])
    first, second = first or [1.0] * count, second or [1.0] * count
    return len(first) == len(second) and all(map(math.isclose, first, second))


def check_learning_rate(hparams: dict[str, Any], lr: float, checkpoint_path: str) -> None:
    """Refuse (`ResumeRefused`) to continue a checkpoint (its `hparams`) at an `auto` learning
    rate `lr` other than it trained at: the rule scales the rate with the images per optimizer
    step, which a resume on another number of processes changes."""
    optim = hparams.get("optim") or {}
    trained = (optim.get("optimizer") or {}).get("lr")
    if trained is None or math.isclose(float(trained), float(lr), rel_tol=1e-6):
        return
    raise ResumeRefused(
        f"Cannot resume {checkpoint_path} at optim.optimizer.lr={lr:g}: the run trained at "
        f"{float(trained):g}, and lr=auto scales with the images of one optimizer step, which "
        "the number of processes (trainer.devices x trainer.num_nodes) or "
        "trainer.accumulate_grad_batches changed. Fix: resume with the run's devices, or add "
        f"optim.optimizer.lr={float(trained):g} (and the run's data.batch_size) to the command."
    )


def trained_epochs(checkpoint_path: str | Path) -> int:
    """How many epochs the run of `checkpoint_path` has finished (Lightning's epoch progress,
    which a resume restores as `current_epoch`)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    return lightning_internals.epochs_processed_in_checkpoint(checkpoint)


def check_epochs(
    checkpoint_path: str | Path,
    max_epochs: int | str | None,
    source: Path,
    probe_solved: bool = False,
) -> None:
    """`ResumeRefused` when `max_epochs` asks for no epoch beyond those the checkpoint has
    trained (Lightning would stop with a traceback after writing logs); None or -1: no limit;
    `auto`: not known before the data is (run.train checks the value `finetune.adaptive` chose).
    `probe_solved`: the run's head is the linear probe solved on cached features, whose epochs
    change nothing, so the fix offered is another strategy, not more epochs."""
    if not isinstance(max_epochs, int) or max_epochs < 0:
        return
    trained = trained_epochs(checkpoint_path)
    if max_epochs > trained:
        return
    if max_epochs == trained and _unfinished(source):
        return  # stopped (Ctrl-C) after its last epoch, before its results: the resume ends it
    if probe_solved:
        raise ResumeRefused(
            f"Nothing to resume: the run {source} is the linear probe solved on cached "
            f"features, complete after its {trained} epoch(s); more epochs would change "
            "nothing. Fix: to train on from it, start a new run with strategy=lp_ft (every "
            "layer fine-tunes from the probe) or strategy.cache_features=false (the head "
            "trains on by SGD over augmented images)."
        )
    raise ResumeRefused(
        f"Nothing to resume: the run {source} has trained {trained} epoch(s) and this "
        f"config asks for trainer.max_epochs={max_epochs}. Fix: to train it longer, add "
        f"trainer.max_epochs=N with N > {trained} (e.g. trainer.max_epochs={trained + 1})."
    )


def _unfinished(source: Path) -> bool:
    """Whether `source` (a run dir, or a checkpoint in a run's checkpoints/) is a run that has
    not written its results (metrics.json)."""
    run = source_run_dir(str(source), source)
    return run is not None and not (run / METRICS_FILE).is_file()


def check_split(ckpt_path: Any, run_dir: Path, record: dict[str, Any]) -> None:
    """`ResumeRefused` when the splits the data gives now (`record`, as
    `FinetuneDataModule.split_record()` makes it) are not the ones the resumed run recorded in
    its split.json: the same files, in the same split and class. A run without split.json, or
    no resume, passes."""
    source = source_run_dir(ckpt_path, run_dir)
    if source is None or not (source / SPLIT_FILE).is_file():
        return
    saved = _placement(json.loads((source / SPLIT_FILE).read_text()).get("files") or {})
    now = _placement(record["files"])
    missing = [path for path in saved if path not in now]
    added = [path for path in now if path not in saved]
    moved = [path for path in saved if path in now and saved[path] != now[path]]
    if not (missing or added or moved):
        return
    found = [
        f"{len(paths)} {what} (e.g. {paths[0]})"
        for paths, what in (
            (missing, "files of the run are missing"),
            (added, "files are new"),
            (moved, "files moved to another split or class"),
        )
        if paths
    ]
    raise ResumeRefused(
        f"Cannot resume {source}: the data is not the data it trained on ({'; '.join(found)}; "
        f"the run's splits are in {source / SPLIT_FILE}). A resume must see the same files in "
        "the same splits, or its metrics would mix two splits. Fix: restore the files as they "
        "were, or start a new run from the checkpoint's weights with "
        f"model.weights={source / 'checkpoints' / 'last.ckpt'} and another hydra.run.dir."
    )


def _placement(files: dict[str, dict[str, list[str]]]) -> dict[str, tuple[str, str]]:
    """split.json's `files` (split -> class -> paths) as path -> (split, class)."""
    return {
        path: (split, name)
        for split, by_class in files.items()
        for name, paths in by_class.items()
        for path in paths
    }


def command_line(argv: Sequence[str]) -> list[str]:
    """`argv` of `python train.py` as a resume runs it (`with_saved_overrides`: the resumed
    run's saved overrides first, refusing a change its checkpoint cannot follow), refused too
    (`ResumeRefused`, before Hydra starts) when it asks for no epoch beyond those the
    checkpoint trained. Other command lines come back unchanged."""
    command = with_saved_overrides(argv)
    if command.checkpoint is not None and command.cfg is not None:
        solved = strategies.plan(command.cfg).regime == "probe"
        max_epochs = command.cfg.trainer.get("max_epochs")
        check_epochs(command.checkpoint, max_epochs, command.source, probe_solved=solved)
    return command.argv


@contextlib.contextmanager
def _as_it_was(run_dir: Path, in_place: bool) -> Iterator[None]:
    """A `FinetuneError` of a resume in place raised as `ResumeRefused` (train.py then writes
    no failure.json into the run, and cuts its log back)."""
    try:
        yield
    except FinetuneError as error:
        if in_place and not isinstance(error, ResumeRefused):
            raise ResumeRefused(f"{error} (The run dir {run_dir} is as it was.)") from error
        raise


@dataclass(frozen=True)
class ResumePlan:
    """What a run resumes, decided once from its config and run dir (`of`); the training flow
    asks it what to verify, write and restore rather than carrying a flag through its steps.
    A run that resumes nothing has no `checkpoint`."""

    run_dir: Path
    ckpt_path: Any  # as the config gives it: None, `last`, a run dir or a .ckpt file
    checkpoint: str | None  # the file the fit continues from
    # continues the run of `run_dir` itself: its files (config, classes, split, weights
    # report) stay as they are, and an error before training leaves the whole dir as it was
    in_place: bool

    @classmethod
    def of(cls, cfg: DictConfig, run_dir: Path) -> ResumePlan:
        """The plan of `cfg.ckpt_path` for the run in `run_dir`, once its config is checked
        against the resumed run's saved one (`check_config`: each change applied is logged).
        Raises `ResumeRefused` for a change the checkpoint cannot follow, `FinetuneError`
        (in place: `ResumeRefused`) for a `ckpt_path` that names no checkpoint."""
        ckpt_path = cfg.get("ckpt_path")
        in_place = is_in_place(ckpt_path, run_dir)
        with _as_it_was(run_dir, in_place):
            checkpoint = resolve_checkpoint(ckpt_path, run_dir)
            check_config(cfg, run_dir)
        return cls(run_dir, ckpt_path, checkpoint, in_place)

    @property
    def restores_head(self) -> bool:
        """Whether the checkpoint restores the head (the probe's solve is not repeated) and the
        reports of the probe and of the feature cache of the run's first process."""
        return self.checkpoint is not None

    @property
    def silenced_warnings(self) -> tuple[str, ...]:
        """Messages (regular expressions) of Lightning's warnings the fit ignores."""
        return RESUME_WARNINGS if self.checkpoint is not None else ()

    def kept_as_it_was(self) -> contextlib.AbstractContextManager[None]:
        """Within it, a `FinetuneError` of a resume in place is a `ResumeRefused`: the run dir
        is as it was (nothing of it written before training)."""
        return _as_it_was(self.run_dir, self.in_place)

    def verify(
        self,
        cfg: DictConfig,
        chosen: dict[str, Any],
        datamodule: FinetuneDataModule,
        regime: str,
    ) -> None:
        """Refuse the checkpoint (`ResumeRefused`, or `FinetuneError` for one of another
        experiment) when it holds another model or other classes than `cfg` and `datamodule`,
        when lr=auto (`chosen`, `finetune.adaptive.resolve`'s) chose another rate than it
        trained at, when the data's splits are not those of its run, or when `cfg` asks for no
        epoch beyond those it trained (`regime`: the run's, for the fix offered). Nothing to
        verify without a checkpoint."""
        if self.checkpoint is None:
            return
        auto_lr = cfg.optim.optimizer.lr if "optim.optimizer.lr" in chosen else None
        check_compatible(
            self.checkpoint,
            datamodule.class_names,
            cfg.model.name,
            auto_lr,
            datamodule.class_weight,
        )
        check_split(self.ckpt_path, self.run_dir, datamodule.split_record())
        check_epochs(
            self.checkpoint,
            cfg.trainer.get("max_epochs"),
            Path(self.checkpoint),
            probe_solved=regime == "probe",
        )
        checkpoint = Path(self.checkpoint)
        source = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
        log.info(
            "Resuming %s from epoch %d (%s) into %s",
            source,
            trained_epochs(checkpoint),  # epochs counted from 0, as checkpoints are named
            checkpoint.name,
            self.run_dir,
        )
