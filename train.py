"""Fine-tune an ImageNet-pretrained backbone: `python train.py model=... strategy=... data=...`.

A thin Hydra entry point; the flow itself lives in `finetune.run.train`. Before Hydra starts
(and creates the run dir), the command line is composed once and checked against the schema
(`finetune.config`): a wrong key, option or type ends here with one message and exit status 1.
A resume (`hydra.run.dir=D ckpt_path=last`) first gets D's own saved overrides
(`finetune.resume.command_line`). Ctrl-C prints the command that continues the run (exit 130);
a new run stopped by Ctrl-C or an error before its first checkpoint leaves no run dir.
"""

import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune import config, interrupt
from finetune.errors import FinetuneError
from finetune.resume_config import ResumeRefused
from finetune.rundir import METRICS_FILE, holds_results, save_failure

log = logging.getLogger("finetune")


def hydra_task(
    resumed_log: tuple[Path, int | None] | None, new_run_dir: bool
) -> Callable[[], None]:
    """The Hydra entry point (`@hydra.main`) of this command line. `resumed_log`: for a resume
    in place, the run's log file and its size before this process appends to it
    (`interrupt.log_before_resume`), so that a resume that stops before training leaves the
    run dir as it was. `new_run_dir`: the run dir did not exist before this process (Hydra
    makes it), so a run refused before training may remove it rather than leave a folder
    holding only its failure."""

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def main(cfg: DictConfig) -> float | None:
        # torch and Lightning load here, after the command line was checked: a typo is refused
        # in well under a second, not after the seconds these imports take.
        from finetune.distributed import job_processes
        from finetune.run import train

        in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            # values a sweeper chose were not on the command line train.py checked
            config.validate(cfg, HydraConfig.get().runtime.choices)
            with job_processes(cfg):  # DDP ranks of a sweep job re-run that job only
                metrics = train(cfg)
        except KeyboardInterrupt:
            run_dir = Path(cfg.run_dir)
            # A sweep keeps its jobs' folders: the summary lists an interrupted job.
            if new_run_dir and not in_sweep and remove_unkept(run_dir):
                log.warning("%s", interrupt.nothing_kept_message(run_dir))
            else:
                log.warning("%s", interrupt.interrupted_message(run_dir, cfg))
            sys.exit(130)
        except Exception as error:
            # A refused resume leaves its run dir as it was; a finished run stays finished.
            refused = isinstance(error, ResumeRefused)
            run_dir = Path(cfg.run_dir)
            # The sweep summary counts a failed job by its failure.json: kept in a sweep. A
            # single run's new folder with nothing worth keeping goes: the error is on the
            # console, and a folder holding only failure.json would be clutter.
            unkept = new_run_dir and not in_sweep and not holds_results(run_dir)
            if not (refused or unkept or (run_dir / METRICS_FILE).is_file()):
                save_failure(run_dir, error)
            if in_sweep:
                # One failed job must not end a sweep (Hydra's basic sweeper stops at a raised
                # error): log it and leave failure.json for the sweep summary. The Optuna
                # sweeper records the None objective as a failed trial
                # (hparams_search/optuna.yaml allows any failure rate).
                # A FinetuneError is the whole story (no traceback), as in a single run.
                report = log.error if isinstance(error, FinetuneError) else log.exception
                report("This run failed; the sweep goes on: %s", error)
                return None
            if isinstance(error, FinetuneError):
                log.error("%s", error)
            if unkept and remove_unkept(run_dir):  # before the traceback of any other error
                log.info("Nothing was kept: the run dir %s was removed.", run_dir)
            if isinstance(error, FinetuneError):
                if refused and resumed_log is not None:
                    # the log too: this attempt is on the console
                    interrupt.restore_size(*resumed_log)
                sys.exit(1)  # a single run: the message above is the whole story, no traceback
            raise
        return float(metrics["val/acc"])  # the objective for hyperparameter sweepers

    return main


def remove_unkept(run_dir: Path) -> bool:
    """Remove the run dir this process made for a run that stopped (refused, failed or
    interrupted) before anything worth keeping was written: its config, log, split and the
    logger folders. One that holds a checkpoint or results after all stays: a run started in
    the same second by another process shares the time-named folder. Returns whether the
    folder was removed (the caller says so)."""
    if holds_results(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


if __name__ == "__main__":
    sys.argv[1:] = config.expand_home(sys.argv[1:])
    argv = sys.argv[1:]
    resuming = any(arg.lstrip("+").startswith("ckpt_path=") for arg in argv)
    try:
        if resuming:  # the run's own overrides first
            # Lightning, imported while the root logger has no handler, gives its loggers a
            # console handler of their own and stops them propagating: its lines would miss the
            # log prefix and train.log. Hydra replaces this handler when it sets up logging.
            logging.getLogger().addHandler(logging.NullHandler())
            # (imports torch, to read the checkpoint: only for a resume)
            from finetune import resume

            argv = resume.command_line(argv)
        # a new run in a used run dir: refused before Hydra rewrites its .hydra/ and log
        config.check_command_line(argv, new_run=not resuming)
    except FinetuneError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.argv[1:] = argv
    named_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    # without hydra.run.dir, Hydra names a new folder after the time
    new_run_dir = not resuming and not any(Path(d).expanduser().exists() for d in named_dirs)
    hydra_task(interrupt.log_before_resume(argv) if resuming else None, new_run_dir)()
