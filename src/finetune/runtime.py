"""Process setup before a run: allocator tuning, device checks, speed switches, a writable run
dir, the seed. Nothing here changes what is learned."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from finetune.errors import FinetuneError


def prepare(cfg: DictConfig) -> Path:
    """Set the process up for the run of `cfg` and return its run dir (created).

    Raises `FinetuneError` when `trainer.devices` exceeds the machine or the run dir is not
    writable, before anything is written.
    """
    # Frozen parts of the network are in eval mode on purpose (see strategies.py).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning's own pytree helper uses a torch API that this torch deprecates: nothing the
    # user can act on, printed at every checkpoint restore.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning counts log_every_n_steps across epochs, so an epoch of fewer batches still
    # logs; its warning that the epoch is shorter than the interval would only alarm.
    warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
    # Restoring a checkpoint written in another folder (a resume into a new run dir, a run dir
    # moved, and after such a resume the evaluation of a best checkpoint the earlier process
    # wrote): BestCheckpoint carries its kept checkpoints over itself (finetune.callbacks), and
    # the last-checkpoint callback keeps none, so the stock warning would only alarm.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed")
    # Lightning's advertisement for its cloud logger, printed by every Trainer.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_no_litlogger_tip)
    keep_freed_memory_in_process()
    check_devices(cfg.trainer)
    run_dir = Path(cfg.run_dir)
    require_writable(run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    return run_dir


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def keep_freed_memory_in_process() -> None:
    """Stop glibc from returning large tensor buffers to the OS after every use.

    By default glibc serves each allocation above its mmap threshold (at most 32 MB) from a
    fresh mmap and unmaps it on free, so every training step page-faults gigabytes of zeroed
    memory: on a 2-core CPU that was a third of the time of an EfficientNet step and made whole
    epochs stall. Serving everything from the heap and never trimming it keeps the memory in the
    process (a somewhat higher resident size) and removes the faults.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)


def require_writable(run_dir: Path) -> None:
    """Create `run_dir` and prove a file can be written in it; `FinetuneError` otherwise."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise FinetuneError(
            f"Cannot write the run dir {run_dir} ({error.strerror}). Fix: choose a writable "
            "folder with hydra.run.dir=..., or free space on that disk."
        ) from error


def check_devices(trainer_cfg: DictConfig) -> None:
    """`trainer.devices` as a count must not exceed what the machine has (`FinetuneError`)."""
    devices, accelerator = trainer_cfg.get("devices", 1), str(trainer_cfg.get("accelerator"))
    if not isinstance(devices, int) or devices < 1:
        return  # "auto", -1 or a list of ids: Lightning resolves and checks those
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0):
        available, kind = gpus, "GPU"
    elif accelerator in ("cpu", "auto"):
        available, kind = os.cpu_count() or 1, "CPU core"
    else:
        return
    if devices > available:
        raise FinetuneError(
            f"trainer.devices={devices} with trainer.accelerator={accelerator}, but this machine "
            f"has {available} {kind}(s). Fix: trainer.devices={max(available, 1)} or fewer"
            + (", or trainer=cpu to train on the CPU." if kind == "GPU" else ".")
        )


def speed_switches(cfg: DictConfig, network: torch.nn.Module) -> dict[str, bool]:
    """`speed.channels_last` and `speed.compile` as plain booleans.

    channels_last `auto` means on for convolutional networks: NHWC convolutions were 20-25%
    faster per training step on this project's CPU (efficientnet_lite0, mobilenet_v2,
    resnet50) and are the fast path of cuDNN with mixed precision; a vision transformer
    (a single patch-embedding convolution) stays as it is.
    """
    speed = cfg.get("speed") or {}
    channels_last = speed.get("channels_last", "auto")
    if channels_last == "auto":
        convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in network.modules())
        channels_last = convolutions >= 5
    return {"channels_last": bool(channels_last), "compile": bool(speed.get("compile", False))}
