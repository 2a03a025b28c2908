"""Fine-tune an ImageNet-pretrained backbone: `python train.py model=... strategy=... data=...`.

A thin Hydra entry point; the flow itself lives in `finetune.run.train`.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune.errors import FinetuneError
from finetune.run import train

log = logging.getLogger("finetune")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
    except FinetuneError as error:
        log.error("%s", error)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records this job as failed and the sweep goes on
        sys.exit(1)  # a single run: the message above is the whole story, no traceback
    return float(metrics["val/acc"])  # the objective for hyperparameter sweepers


if __name__ == "__main__":
    main()
