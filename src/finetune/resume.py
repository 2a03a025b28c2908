"""Resuming: checkpoints that a kill cannot corrupt, random state that survives, clear refusals.

- `AtomicCheckpointIO` writes every checkpoint with `finetune.atomic.atomic_write`, so a
  kill (or a full disk) during a write never replaces the last good checkpoint.
- `RandomState` saves the global random number generators (torch, CUDA, numpy, python) in each
  checkpoint and restores them on resume. The data loaders draw nothing from them (their order
  and augmentation are seeded by epoch and index, see `finetune.data.EpochSampler`), so a
  resumed run continues with exactly the random numbers an uninterrupted run would have used.
- `resolve_checkpoint` turns `ckpt_path=last` or a run dir into a checkpoint file, and refuses a
  checkpoint of another experiment (other classes, another model) with a message that points
  to the weights-loading path (`model.weights=...`) instead.
"""

from __future__ import annotations

import errno
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from finetune.atomic import atomic_write
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint written with `finetune.atomic.atomic_write`: beside the target, then
    renamed over it. A full disk or unwritable folder is a `FinetuneError` naming the fix."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        try:
            atomic_write(path, lambda handle: torch.save(checkpoint, handle))
        except OSError as error:
            reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror
            raise FinetuneError(
                f"Could not write the checkpoint {path} ({reason}: {error}). The checkpoints "
                f"written before are intact in {path.parent}. Fix: free space or make the run "
                "dir writable, then resume with ckpt_path=last and the same hydra.run.dir."
            ) from error


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


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` (this run dir's last checkpoint), a run dir (its last checkpoint) or a file."""
    if ckpt_path in (None, "", "null"):
        return None
    candidate = run_dir if ckpt_path == "last" else Path(str(ckpt_path)).expanduser()
    if candidate.is_dir():
        candidate = candidate / "checkpoints" / "last.ckpt"
    if not candidate.is_file():
        hint = (
            "ckpt_path=last resumes the run in hydra.run.dir: pass the interrupted run's folder "
            "as hydra.run.dir=outputs/runs/<run>"
            if ckpt_path == "last"
            else "point ckpt_path at a .ckpt file or at a run dir with checkpoints/last.ckpt"
        )
        raise FinetuneError(f"No checkpoint to resume from at {candidate}. Fix: {hint}.")
    return str(candidate)


def check_compatible(checkpoint_path: str, class_names: list[str], model_name: str) -> None:
    """Refuse to resume from a checkpoint of a different experiment, before Lightning fails with
    a wall of size-mismatch errors."""
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
    if problems:
        raise FinetuneError(
            f"Cannot resume from {checkpoint_path}: {'; '.join(problems)}. ckpt_path continues "
            "the same experiment. Fix: to start a new run from those weights, use "
            f"model.weights={checkpoint_path} (loaded bottom-up: every layer that fits, up to "
            "the first that does not), or resume with the original model and data."
        )
