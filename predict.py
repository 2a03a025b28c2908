"""Predict the classes of new images with a trained run:
`python predict.py ckpt=<run dir or .ckpt> inputs=<files, folders or a quoted glob>`.

A thin Hydra entry point; the work is in `finetune.predict.run`. Writes predictions.csv into its
own run dir (`outputs/predict/<time>/`, or `output=<file.csv>`).
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.config import check_command_line, expand_home, without_run_dir
from finetune.errors import FinetuneError
from finetune.predict import run

log = logging.getLogger("finetune")


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, output_dir)
    except FinetuneError as error:
        log.error("%s", error)
        sys.exit(1)  # the message says what and how to fix it: no traceback


if __name__ == "__main__":
    sys.argv[1:] = expand_home(sys.argv[1:])  # `inputs=~/photos` as typed
    try:  # a wrong key, value or type: one message, before the model loads
        check_command_line(sys.argv[1:], config_name="predict")
    except FinetuneError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.argv[1:] = without_run_dir(sys.argv[1:])  # output=F: no run dir of Hydra's files
    main()
