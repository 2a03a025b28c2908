"""What Ctrl-C leaves, and a resume in place that leaves its run dir as it was.

- `interrupted_message` names the run dir and the command that continues it, with the
  overrides the run applied on top of its saved config (e.g. `trainer.max_epochs=40`);
  `nothing_kept_message` says that a new run stopped before its first checkpoint left nothing.
- `log_before_resume` / `restore_size`: the run's log cut back after a refused resume.
- `ctrl_c_as_interrupt`: Lightning's ways of ending a Ctrl-C, as the KeyboardInterrupt it was.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml
from omegaconf import DictConfig, OmegaConf

from finetune.resume_config import ABSENT, config_changes, is_in_place


def continue_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir` (`python train.py hydra.run.dir=...
    ckpt_path=last`), as it can be typed in a shell from the current folder."""
    script = shlex.quote(sys.argv[0] if sys.argv[0].endswith(".py") else "train.py")
    return f"python {script} hydra.run.dir={shlex.quote(str(run_dir))} ckpt_path=last"


def restore_size(path: Path, size: int | None) -> None:
    """Cut `path` back to `size` bytes (a log appended to since), or delete it when it did not
    exist (`size` None); a file already gone or unwritable stays as it is."""
    with contextlib.suppress(OSError):
        if size is None:
            path.unlink()
        elif path.stat().st_size > size:
            os.truncate(path, size)


def applied_overrides(cfg: DictConfig | None, run_dir: Path) -> list[str]:
    """`key=value` overrides (shell-quoted) for every value of `cfg` that differs from the run's
    saved config.yaml: what a resume applied on top of it (e.g. `trainer.max_epochs=40`), so
    the next resume asks for the same; [] without a `cfg` or a saved config. A key the saved
    config lacks is left out: a resume gives it its default again."""
    if cfg is None or not (run_dir / "config.yaml").is_file():
        return []
    changes = config_changes(OmegaConf.load(run_dir / "config.yaml"), cfg)
    return [
        shlex.quote(f"{key}={_override_value(new)}")
        for key, (old, new) in changes.items()
        if old != ABSENT
    ]


def _override_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def interrupted_message(run_dir: Path, cfg: DictConfig | None = None) -> str:
    """What Ctrl-C leaves: the run dir and the command that continues it from its last
    checkpoint (with the overrides `cfg` applied on top of the run's saved config), or that
    there is none yet."""
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        command = " ".join([continue_command(run_dir), *applied_overrides(cfg, run_dir)])
        return (
            f"Interrupted. The run dir {run_dir} holds the last finished epoch "
            f"(checkpoints/last.ckpt). Continue it with: {command}"
        )
    return (
        f"Interrupted before the first epoch finished: {run_dir} holds no checkpoint to "
        "continue from. Start the run again with the same command."
    )


def nothing_kept_message(run_dir: Path) -> str:
    """What Ctrl-C leaves of a new run stopped before its first checkpoint: nothing, the run
    dir it made is removed (train.py)."""
    return (
        f"Interrupted before anything worth keeping was written: nothing was kept (the run "
        f"dir {run_dir} was removed). Start the run again with the same command."
    )


def log_before_resume(argv: Sequence[str]) -> tuple[Path, int | None] | None:
    """For a resume in place, the run's log file (Hydra's `<script>.log` in the run dir) and
    its size now (None when absent), for `restore_size`; None for any other command line."""
    given = dict(line.split("=", 1) for line in argv if "=" in line)
    run_dir = given.get("hydra.run.dir", "").strip("'\"")
    if not run_dir or not is_in_place(given.get("ckpt_path"), Path(run_dir)):
        return None
    path = Path(run_dir) / f"{Path(sys.argv[0]).stem}.log"
    return path, path.stat().st_size if path.is_file() else None


class Interruptible(Protocol):
    """What `ctrl_c_as_interrupt` reads of a Lightning Trainer (this module imports no torch)."""

    @property
    def interrupted(self) -> bool: ...


@contextlib.contextmanager
def ctrl_c_as_interrupt(trainer: Interruptible) -> Iterator[None]:
    """Raise KeyboardInterrupt (the caller prints how to continue the run) where Lightning
    ends a Ctrl-C in `fit`, `validate` or `test` with exit(1), or with an error of its own
    shutdown raised while handling it (a callback's on_exception after the loaders were torn
    down). Any other error stays itself (Lightning marks the trainer interrupted for all)."""
    try:
        yield
    except SystemExit:
        if trainer.interrupted:  # Lightning's exit(1) after Ctrl-C
            raise KeyboardInterrupt from None
        raise
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__context__
        if cause is not None:
            raise KeyboardInterrupt from error
        raise
