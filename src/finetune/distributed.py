"""Runs that span several processes, nodes or cluster jobs: the two gaps Lightning and Hydra leave.

1. Lightning's DDP launcher starts the extra ranks of a machine by re-running the script with
   the ORIGINAL command line plus `hydra.run.dir=...` (lightning_fabric's
   `_hydra_subprocess_cmd`). Inside a Hydra multirun that command still holds `-m` and every
   swept value, so each extra rank re-ran the whole sweep into a second timestamped folder
   (Lightning issue #15689). `job_processes` makes that command a single run of exactly the
   current job, into the current job's folder.
2. Processes that start together (torchrun or srun ranks, the jobs of a sweep) share one data
   root. `build_once` is an inter-process file lock around "build it if it is missing", so the
   generated data set, the image verification record and the feature cache are built by the
   first process and read by the others, never written by several at once.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, read_write

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)


def _processes_per_machine(trainer_cfg: DictConfig) -> int:
    """How many processes Lightning starts on this machine for `trainer.devices` (a count, a
    string count, a list or comma string of ids, or auto/-1: every visible GPU, one CPU)."""
    devices = trainer_cfg.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        on_cpu = trainer_cfg.get("accelerator") == "cpu"
        return 1 if on_cpu else max(torch.cuda.device_count(), 1)
    if isinstance(devices, str):
        ids = [d for d in devices.split(",") if d.strip()]
        return int(devices) if "," not in devices else len(ids)
    return devices if isinstance(devices, int) else len(devices)


def world_size(trainer_cfg: DictConfig) -> int:
    """How many processes train together: WORLD_SIZE where a launcher set it (torchrun,
    Lightning's own ranks), else per machine (`trainer.devices`) x `trainer.num_nodes`; at
    least 1 (`finetune.run` checks the number against the trainer's once it exists)."""
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return max(int(os.environ["WORLD_SIZE"]), 1)
    processes = _processes_per_machine(trainer_cfg) * int(trainer_cfg.get("num_nodes") or 1)
    return max(processes, 1)


@contextmanager
def job_processes(cfg: DictConfig) -> Iterator[None]:
    """Inside a Hydra multirun job, make Lightning's extra DDP ranks re-run only this job.

    Rewrites `sys.argv` to this job's overrides (without `-m`), points the Hydra config's
    `hydra.run.dir` (which Lightning appends to the child command) at this job's output folder,
    and restores `sys.argv` and the rank variables and ends the process group afterwards, so
    the next job of a sweep starts from a clean state.
    Outside a multirun (a single run, torchrun, srun) nothing changes.

    Raises FinetuneError for `trainer.devices` > 1 inside a job of the submitit *local*
    launcher: its jobs are not scripts Lightning could re-run.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and _processes_per_machine(cfg.trainer) > 1:
        raise FinetuneError(
            f"trainer.devices={cfg.trainer.devices} inside a job of hydra/launcher=local: each "
            "local job is one process, which Lightning cannot re-run for more ranks. Fix: "
            "trainer.devices=1, or drop hydra/launcher=local (a plain -m sweep runs several "
            "devices per job), or use hydra/launcher=slurm trainer=slurm on a cluster."
        )
    hydra_cfg = HydraConfig.get()
    job_dir = hydra_cfg.runtime.output_dir
    # hydra.mode=MULTIRUN is among the recorded overrides: the children must be single runs.
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]
    original_argv, original_env = list(sys.argv), dict(os.environ)
    sys.argv[1:] = [*hydra_overrides, *hydra_cfg.overrides.task, f"hydra.run.dir={job_dir}"]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = job_dir
    try:
        yield
    finally:
        sys.argv[:] = original_argv
        _forget_ranks(original_env)


def _forget_ranks(original_env: dict[str, str]) -> None:
    """Leave no DDP state to the next job of a sweep in this process.

    Lightning's launcher exports LOCAL_RANK, MASTER_PORT, ... into this process's environment
    (the next job's Trainer would take them for ranks started by someone else and spawn none),
    and its process group outlives the Trainer (the next job would talk to the exited ranks).
    """
    for name in _RANK_VARIABLES:
        if name in original_env:
            os.environ[name] = original_env[name]
        else:
            os.environ.pop(name, None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# What Lightning's subprocess launcher sets in the launching process (lightning_fabric
# strategies/launchers/subprocess_script.py, _call_children_scripts).
_RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def build_once(folder: Path, name: str, create: bool = True) -> Iterator[None]:
    """Hold the inter-process lock `<folder>/<name>.lock` while building files in `folder`.

    Every process that builds-if-missing a shared file (data generation, the verification
    record, the feature cache) takes the lock first: the first one builds, the others wait and
    then find the file whole. `filelock` locks with fcntl/flock, which also holds across the
    machines of a cluster on a shared file system that supports locks (NFSv4, Lustre, GPFS).
    A folder that cannot hold a lock file (a read-only data root: nothing is written there
    either) is used without one. `create=False`: make `folder` only inside an existing parent,
    so that a mistyped folder of the user's own images is reported as missing, not created.
    """
    try:
        if not create and not folder.parent.is_dir():
            raise FileNotFoundError(f"{folder.parent} does not exist")
        folder.mkdir(parents=create, exist_ok=True)
        lock = FileLock(str(folder / f"{name}.lock"))
        lock.acquire(timeout=0.5)
    except Timeout:
        log.info("Waiting for another process that is building %s in %s", name, folder)
        lock.acquire()
    except OSError as error:
        log.debug("No lock for %s in %s (%s); going on without one", name, folder, error)
        yield
        return
    try:
        yield
    finally:
        lock.release()
