"""From laptop to cluster (docs/cluster.md): submitit launchers, multi-node DDP through torchrun,
several devices per sweep job, and one build of the shared data caches when processes race."""

from __future__ import annotations

import csv
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from conftest import CONF_DIR, FAST_OVERRIDES, REPO, run_train, subprocess_env

# The evaluation numbers every process count must agree on.
EVALUATION_KEYS = (
    "val/acc",
    "val/loss",
    "test/acc",
    "test/loss",
    "val/confusion_matrix",
    "val/acc_per_class",
    "test/confusion_matrix",
)


# Several processes, launchers and nodes per test: CI's slow step (`pytest -m slow`) runs them.
pytestmark = pytest.mark.slow


def _summary_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_slurm_launcher_gives_each_job_the_ddp_of_its_allocation(tmp_path, monkeypatch):
    """hydra/launcher=slurm trainer=slurm: the sbatch script asks for the nodes, GPUs, tasks,
    partition and time limit given once, and in the job SLURM's variables for that allocation
    become the Trainer's devices and num_nodes."""
    import submitit

    GlobalHydra.instance().clear()
    overrides = [
        "hydra/launcher=slurm",
        "trainer=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=90",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)

    # The executor as the launcher plugin builds it from hydra.launcher (launch() without the
    # sbatch call); submitit checks every key. No srun here: claim one CPU of affinity.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=str(tmp_path / params.pop("submitit_folder")),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{key if key in common else f"slurm_{key}": value for key, value in params.items()}
    )
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "0")
    for line in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {line}" in script
    assert "#SBATCH --time=90" in script

    # Inside the job SLURM exports the allocation; trainer=slurm reads it.
    sbatch = dict(re.findall(r"#SBATCH --([a-z-]+)=(\S+)", script))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", sbatch["ntasks-per-node"])
    monkeypatch.setenv("SLURM_NNODES", sbatch["nodes"])
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert (trainer["devices"], trainer["num_nodes"], trainer["strategy"]) == (4, 2, "ddp")
    # Outside SLURM (a laptop trying the option): one device, one node.
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.delenv("SLURM_NNODES")
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert (trainer["devices"], trainer["num_nodes"]) == (1, 1)


def test_local_launcher_runs_a_two_job_sweep_as_subprocesses_and_summarises_it(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        "augment=none",
        "seed=1,2",
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep}",
        f"data.root={tmp_path / 'data'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, seed in (("0", 1), ("1", 2)):
        assert _metrics(sweep / job)["seed"] == seed
    # Each job ran in its own submitit process, with its own log under .submitit/.
    job_logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert len(job_logs) == 2, job_logs
    rows = _summary_rows(sweep)
    assert [(row["seed"], row["status"]) for row in rows] == [("1", "ok"), ("2", "ok")]


def test_local_launcher_refuses_several_devices_per_job(tmp_path):
    """A submitit local job is not a script Lightning could re-run for rank 1."""
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep}",
        f"data.root={tmp_path / 'data'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]  # a failed job does not end the sweep
    error = json.loads((sweep / "0" / "failure.json").read_text())["error"]
    assert "trainer.devices=2 inside a job of hydra/launcher=local" in error
    assert "Fix: trainer.devices=1" in error


def test_a_sweep_with_two_devices_per_job_writes_one_sweep_folder(tmp_path):
    """Lightning re-runs the command line for rank 1: that must be this job, not the sweep."""
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        "augment=none",
        "seed=1,2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"data.root={tmp_path / 'data'}",
        cwd=tmp_path,  # the default sweep folder: outputs/multirun/<time> under tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        assert _metrics(sweep / job)["seed"] == seed
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job dir
    assert [row["status"] for row in _summary_rows(sweep)] == ["ok", "ok"]
    assert "No runs found" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs" / "runs").exists()  # rank 1 made no run dir of its own


def _torchrun_node(node_rank: int, port: int, run_dir: Path, data_root: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        str(REPO / "train.py"),
        *FAST_OVERRIDES,
        "augment=none",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.strategy=ddp",
        f"data.root={data_root}",
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(
        command,
        cwd=run_dir.parent,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run_files(run_dir: Path) -> set[str]:
    """What a run wrote, without the logs (their names follow the launcher, not the run)."""
    names = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    return {name for name in names if not name.endswith(".log") and "events.out" not in name}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The same run as two DDP processes on one node and as two torchrun "nodes" of one
    process each on localhost (gloo): (single-node run dir, two-node run dir)."""
    root = tmp_path_factory.mktemp("ranks")
    data_root = root / "data"
    single = root / "single_node"
    result = run_train(
        *FAST_OVERRIDES,
        "augment=none",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"data.root={data_root}",
        f"hydra.run.dir={single}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    two_nodes = root / "two_nodes"
    port = _free_port()
    nodes = [_torchrun_node(rank, port, two_nodes, data_root) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    return single, two_nodes


def test_two_nodes_through_torchrun_write_one_run_dir_from_rank_zero(two_process_runs):
    single, two_nodes = two_process_runs
    root = two_nodes.parent
    assert sorted(p.name for p in root.iterdir()) == ["data", "single_node", "two_nodes"]
    # Rank 0 alone wrote the run: the same files as the one-node run (where rank 1 is
    # Lightning's child), as many TensorBoard event files.
    assert _run_files(two_nodes) == _run_files(single)
    assert len(list(two_nodes.rglob("events.out.tfevents.*"))) == len(
        list(single.rglob("events.out.tfevents.*"))
    )


def test_two_nodes_through_torchrun_equal_two_processes_on_one_node(two_process_runs):
    one, two = (_metrics(run_dir) for run_dir in two_process_runs)
    for key in EVALUATION_KEYS:
        expected = pytest.approx(one[key]) if isinstance(one[key], float) else one[key]
        assert two[key] == expected, key


def test_two_processes_evaluate_every_image_exactly_once(two_process_runs):
    for run_dir in two_process_runs:
        metrics = _metrics(run_dir)
        for split in ("val", "test"):
            counted = sum(map(sum, metrics[f"{split}/confusion_matrix"]))
            assert counted == metrics["split_sizes"][split], (run_dir.name, split)


def test_two_jobs_at_once_on_one_data_root_build_the_caches_once(tmp_path):
    """Two runs started together on a fresh data root: one generates, verifies and extracts,
    the other waits and reuses the whole files."""
    data_root = tmp_path / "data"
    cache_dir = tmp_path / "cache"  # the project's cache folder, fresh for these two runs
    runs = []
    for name in ("a", "b"):
        command = [
            sys.executable,
            str(REPO / "train.py"),
            *FAST_OVERRIDES,
            "strategy=last_layer",
            "augment=none",
            f"data.root={data_root}",
            f"hydra.run.dir={tmp_path / name}",
        ]
        runs.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env={**subprocess_env(), "FINETUNE_CACHE_DIR": str(cache_dir)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]

    statuses = sorted(_metrics(tmp_path / name)["feature_cache"] for name in ("a", "b"))
    assert statuses == ["hit", "miss"]  # extracted once, reused by the other run
    cache_files = list((cache_dir / "features").glob("*.pt"))
    assert len(cache_files) == 1
    stored = torch.load(cache_files[0], weights_only=True)
    assert set(stored["features"]) == {"train", "val"}  # the test split is evaluated on images
    records = list((cache_dir / "verified").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text()) == {}
    assert not list(data_root.rglob("*.partial")) and not list(cache_dir.rglob("*.partial"))
    assert "Generating the synthetic dataset" in outputs[0] + outputs[1]
    assert sum("Generating the synthetic dataset" in output for output in outputs) == 1


def test_the_build_lock_never_creates_a_missing_image_folder(tmp_path):
    """A mistyped data.root of the user's own images stays missing (and is reported so)."""
    from finetune.distributed import build_once

    with build_once(tmp_path / "photoz" / ".cache", "prepare", create=False):
        pass
    assert not (tmp_path / "photoz").exists()
    with build_once(tmp_path / "synthetic_root" / ".cache", "prepare"):
        assert (tmp_path / "synthetic_root" / ".cache" / "prepare.lock").exists()
