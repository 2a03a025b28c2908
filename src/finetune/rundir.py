"""Every file a run writes into its run dir, and the final hparams sent to its loggers.

| file | written | read by |
|---|---|---|
| `config.yaml` | before the data is prepared | predict/export, people |
| `classes.json`, `skipped_images.json` | once the classes are known | predict/export, people |
| `split.json` | once the splits are known: which files went where | people |
| `weights_report.json` | once the network is built (pretrained weights only) | people |
| `metrics.json` | when the run finished; its presence means success | sweep summary, benchmarks |
| `classification_report.txt` | with metrics.json: scores per class of the best checkpoint | people |
| `failure.json` | when the run raised (by train.py) | sweep summary |

`find_checkpoint` finds the checkpoint of a run dir for predict, export and `load_classifier`.

Every writer uses `finetune.atomic`, so a reader never sees half a file. With several devices
each rank runs the flow; only rank 0 writes (`rank_zero_only`), the other ranks skip the call.
Lightning itself is imported only where a logger is used, so that `finetune.summary` (which reads
the file names here) starts fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_only  # the object Lightning sets .rank on
from omegaconf import DictConfig, ListConfig, OmegaConf

from finetune.atomic import atomic_write, write_json
from finetune.errors import FinetuneError

CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
SKIPPED_FILE = "skipped_images.json"
SPLIT_FILE = "split.json"
WEIGHTS_REPORT_FILE = "weights_report.json"
METRICS_FILE = "metrics.json"
FAILURE_FILE = "failure.json"
CLASSIFICATION_REPORT_FILE = "classification_report.txt"

log = logging.getLogger(__name__)

# The config that defines an experiment's result (not where its files go or how it is shown).
HPARAM_GROUPS = ("model", "strategy", "data", "optim", "scheduler", "trainer", "seed")


@rank_zero_only
def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml (the resolved config; `auto` keys stay `auto`, see finetune.adaptive), and
    on the console what the run is: its choices and overrides in a few lines, or with
    `print_config=true` the whole config tree."""
    if cfg.get("print_config", False):
        print_config_tree(cfg)
    else:
        log.info("%s", config_summary(cfg, run_dir))
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(run_dir / CONFIG_FILE, lambda handle: handle.write(text.encode()))


# The config groups a user compares runs by, in the order they read them.
SUMMARY_GROUPS = ("model", "strategy", "data", "augment", "optim", "scheduler", "trainer")


def config_summary(cfg: DictConfig, run_dir: Path) -> str:
    """The run dir and the config in a few lines: the option of each main group (Hydra's choices; for a config
    built in code, the names it holds), the command line's overrides, and where the whole
    config is. The full config runs to 130 lines, mostly defaults nobody changed."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        choices = {group: hydra_cfg.runtime.choices.get(group) for group in SUMMARY_GROUPS}
        overrides = " ".join(hydra_cfg.overrides.task) or "none"
    else:
        names = {"model": "model.name", "strategy": "strategy.name", "data": "data.dataset"}
        choices = {group: OmegaConf.select(cfg, key) for group, key in names.items()}
        overrides = "none (a config built in code)"
    chosen = " ".join(f"{group}={option}" for group, option in choices.items() if option)
    return (
        f"Run dir: {run_dir}\nConfig: {chosen}\nOverrides: {overrides}\n"
        f"The whole config: {run_dir / CONFIG_FILE} (print_config=true prints it here)"
    )


def print_config_tree(cfg: DictConfig) -> None:
    """Print the resolved config as a tree, one branch per config group."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config")
    for key, value in cfg.items():
        branch = tree.add(str(key))
        text = OmegaConf.to_yaml(value) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


@rank_zero_only
def save_classes(run_dir: Path, class_names: list[str], skipped: list[str]) -> None:
    """classes.json (class names in label order) and, when images were skipped as unreadable,
    skipped_images.json (their paths)."""
    write_json(run_dir / CLASSES_FILE, class_names)
    if skipped:
        write_json(run_dir / SKIPPED_FILE, skipped)


@rank_zero_only
def save_split(run_dir: Path, record: dict[str, Any]) -> None:
    """split.json: which files each split holds and how they were chosen
    (`FinetuneDataModule.split_record()`)."""
    write_json(run_dir / SPLIT_FILE, record)


@rank_zero_only
def save_weights_report(run_dir: Path, report: Any, loggers: list[Any]) -> None:
    """weights_report.json and the report as text in TensorBoard (`weights/load_report`);
    nothing without a report (no pretrained weights were loaded). `report` is a
    `finetune.weights.LoadReport`."""
    from pytorch_lightning.loggers import TensorBoardLogger

    if report is None:
        return
    write_json(run_dir / WEIGHTS_REPORT_FILE, report.to_dict())
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            table = str(report).replace("\n", "  \n")  # markdown line breaks
            logger.experiment.add_text("weights/load_report", table)


@rank_zero_only
def save_results(
    run_dir: Path, metrics: dict[str, Any], cfg: DictConfig, loggers: list, step: int = 0
) -> None:
    """metrics.json, then the final hparams in every logger (see `log_final_hparams`)."""
    write_json(run_dir / METRICS_FILE, metrics)
    log_final_hparams(loggers, cfg, metrics, step)


@rank_zero_only
def save_classification_report(run_dir: Path, text: str) -> None:
    """classification_report.txt: precision, recall, F1 and support per class, accuracy,
    balanced accuracy and the macro and weighted means of each evaluated split
    (`finetune.class_scores.classification_report`); nothing when `text` is empty."""
    if text:
        atomic_write(
            run_dir / CLASSIFICATION_REPORT_FILE, lambda handle: handle.write(text.encode())
        )


def holds_results(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything of a run worth keeping: metrics.json or a checkpoint
    (`checkpoints/`, made when the first one is written). Its config, log, split and logger
    folders alone are not: the run can be started again from its command."""
    return (run_dir / METRICS_FILE).exists() or (run_dir / "checkpoints").exists()


def save_failure(run_dir: Path, error: BaseException) -> None:
    """failure.json (`{"error": "<type>: <message>"}`): what the sweep summary shows for a run
    that did not finish. An unwritable run dir is ignored: the log still has the error."""
    with contextlib.suppress(OSError):
        write_json(run_dir / FAILURE_FILE, {"error": f"{type(error).__name__}: {error}"})


def log_final_hparams(
    loggers: list[Any], cfg: DictConfig, metrics: dict[str, Any], step: int = 0
) -> None:
    """Record the config with the final numbers, so TensorBoard's hparams tab compares runs of
    a sweep by their results (not by a placeholder hp_metric): there the keys a user compares
    first (`compared_hparams`), elsewhere (the CSV logger's hparams.yaml) the whole config.
    The final numbers are the float metrics with a stage (`val/acc` -> `final/val_acc`), at
    the run's last optimizer `step`: a resume that trains on logs its own at a later step, not
    a second value at 0."""
    from pytorch_lightning.loggers import TensorBoardLogger

    experiment = {key: cfg[key] for key in HPARAM_GROUPS if key in cfg}
    params = {
        key: _hparam_value(value)
        for key, value in flatten(OmegaConf.to_container(OmegaConf.create(experiment))).items()
    }
    final = {
        f"final/{name.replace('/', '_')}": value
        for name, value in metrics.items()
        if isinstance(value, float) and "/" in name
    }
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(compared_hparams(cfg), metrics=final, step=step)
        else:
            logger.log_hyperparams(params)
        logger.save()


# What TensorBoard's HPARAMS table shows first, in this order (its columns): the whole config
# there is 70 data.augment.* keys before the strategy, the seed or the learning rate.
COMPARED_KEYS = (
    "model.name",
    "strategy.name",
    "seed",
    "optim.optimizer.lr",
    "data.batch_size",
    "trainer.max_epochs",
    "data.dataset",
)


def compared_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters runs are compared by: `COMPARED_KEYS`, the augmentation preset
    (`augment`, Hydra's choice; absent for a config built in code) and the value of every
    key the command line set (a sweep's `strategy.k=1,2,3`), as TensorBoard takes them."""
    from hydra.core.hydra_config import HydraConfig

    keys = list(COMPARED_KEYS)
    params = {key: OmegaConf.select(cfg, key) for key in keys}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        params["augment"] = hydra_cfg.runtime.choices.get("augment")
        for override in hydra_cfg.overrides.task:
            key = override.split("=", 1)[0].lstrip("+~")
            value = OmegaConf.select(cfg, key, default=None)
            if "." in key and not isinstance(value, DictConfig) and key not in params:
                params[key] = value  # (a group choice, strategy=full, is a *.name above)
    return {key: _hparam_value(value) for key, value in params.items()}


def _hparam_value(value: Any) -> Any:
    """A value TensorBoard's hparams take: lists, None and the like as text."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    return str(value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint to predict with: a `.ckpt` file as given, or for a run dir its best
    checkpoint (`checkpoints/*.ckpt` but last.ckpt, the one `metrics.json` names when it names
    one), else `checkpoints/last.ckpt`. Raises `FinetuneError` naming where it looked."""
    candidate = Path(str(path)).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        folder = candidate / "checkpoints" if (candidate / "checkpoints").is_dir() else candidate
        # without metrics.json the latest epoch's: a kept linear probe sorts before the epochs
        kept = (p for p in folder.glob("*.ckpt") if p.name != "last.ckpt")
        best = sorted(kept, key=lambda p: (not p.name.startswith("probe-"), p.name))
        named = _best_named_by_metrics(candidate)
        if named is not None and folder / named in best:
            return folder / named
        if best:
            return best[-1]
        if (folder / "last.ckpt").is_file():
            return folder / "last.ckpt"
        raise FinetuneError(
            f"No checkpoint in {folder} (looked for *.ckpt). Fix: pass ckpt=<run dir> of a run "
            "that finished an epoch, or ckpt=<file.ckpt>."
        )
    raise FinetuneError(
        f"Checkpoint {candidate} does not exist. Fix: pass ckpt=<run dir> (e.g. "
        "outputs/runs/<run>) or ckpt=<path to a .ckpt file>."
    )


def _best_named_by_metrics(run_dir: Path) -> str | None:
    """The file name of the best checkpoint `metrics.json` names; None without one."""
    try:
        best = json.loads((run_dir / METRICS_FILE).read_text()).get("best_checkpoint")
    except (OSError, ValueError):
        return None
    return Path(best).name if best else None
