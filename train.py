"""Fine-tune an ImageNet-pretrained backbone: `python train.py model=... strategy=... data=...`.

A thin Hydra entry point; the flow itself lives in `finetune.run.train`.
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune.distributed import job_processes
from finetune.errors import FinetuneError
from finetune.run import train

log = logging.getLogger("finetune")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        with job_processes(cfg):  # DDP ranks of a sweep job re-run that job only
            metrics = train(cfg)
    except Exception as error:
        record_failure(Path(cfg.run_dir), error)
        if in_sweep:
            # One failed job must not end a sweep (Hydra's basic sweeper stops at a raised
            # error): log it and leave failure.json for the sweep summary. The Optuna sweeper
            # records the None objective as a failed trial (hparams_search/optuna.yaml allows
            # any failure rate).
            log.exception("This run failed; the sweep goes on: %s", error)
            return None
        if isinstance(error, FinetuneError):
            log.error("%s", error)
            sys.exit(1)  # a single run: the message above is the whole story, no traceback
        raise
    return float(metrics["val/acc"])  # the objective for hyperparameter sweepers


def record_failure(run_dir: Path, error: BaseException) -> None:
    """failure.json in the run dir: what the sweep summary shows for a run that did not finish."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        failure = {"error": f"{type(error).__name__}: {error}"}
        (run_dir / "failure.json").write_text(json.dumps(failure, indent=2) + "\n")
    except OSError:  # an unwritable run dir: the log still has the error
        pass


if __name__ == "__main__":
    main()
