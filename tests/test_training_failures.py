"""Training that failed says so: a loss that explodes without becoming NaN stops the run; a
full disk is one message and loses nothing."""

from __future__ import annotations

import errno
import os
import subprocess
from unittest import mock

import pytest
import torch

from finetune.atomic import DiskFullError, atomic_write
from finetune.errors import FinetuneError
from finetune.resume import AtomicCheckpointIO, how_to_continue
from finetune.run import train


def test_a_finite_but_exploding_loss_stops_the_run_naming_the_learning_rate(make_cfg, tmp_path):
    cfg = make_cfg("strategy=full", "augment=none", "optim.optimizer.lr=50", "trainer.max_epochs=3")
    with pytest.raises(FinetuneError) as stopped:
        train(cfg)
    message = str(stopped.value)
    assert message.startswith("Training diverged: the mean training loss of epoch")
    assert "optim.optimizer.lr=50" in message and "though finite" in message
    assert "val/acc is at chance" in message
    # a value to type, never "leave it at auto": auto may be what chose the diverging rate
    assert message.endswith("Fix: start again with a tenth of it, optim.optimizer.lr=5.")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root to mount a tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_under_torch_save_is_one_message_and_the_earlier_file_stays(small_disk):
    target = small_disk / "weights.pt"
    atomic_write(target, lambda handle: torch.save(torch.zeros(10), handle))
    with pytest.raises(DiskFullError) as full:  # torch's zip writer: RuntimeError, no errno
        atomic_write(target, lambda handle: torch.save(torch.zeros(1 << 19), handle))
    assert str(full.value).startswith(f"Could not write {target}: the disk is full")
    assert torch.load(target, weights_only=True).shape == (10,)
    assert [path.name for path in small_disk.iterdir()] == ["weights.pt"]  # no partial file


def test_enospc_from_any_writer_is_the_disk_full_message_and_other_errors_stay(tmp_path):
    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="the disk is full"):
        atomic_write(tmp_path / "summary.csv", full)

    def broken(handle):
        raise RuntimeError("a writer's own bug")

    with pytest.raises(RuntimeError, match="a writer's own bug"):
        atomic_write(tmp_path / "summary.csv", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_does_not_fit_names_the_checkpoint_to_resume_from(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert how_to_continue(checkpoints) == "run the same command again."
    (checkpoints / "epoch=0-step=2.ckpt").write_bytes(b"")
    assert how_to_continue(checkpoints) == (
        f"resume with hydra.run.dir={tmp_path / 'run'} "
        f"'ckpt_path={checkpoints / 'epoch=0-step=2.ckpt'}'."
    )
    (checkpoints / "last.ckpt").write_bytes(b"")
    assert how_to_continue(checkpoints).endswith("ckpt_path=last.")
    io = AtomicCheckpointIO()

    def full(checkpoint, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with (
        pytest.raises(FinetuneError, match=r"checkpoints/best.ckpt \(the disk is full\)"),
        mock.patch("finetune.resume.torch.save", full),
    ):
        io.save_checkpoint({}, checkpoints / "best.ckpt")
