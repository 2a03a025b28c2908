"""Resuming: checkpoints that a kill cannot corrupt, random state that survives, clear refusals.

- `AtomicCheckpointIO` writes every checkpoint with `finetune.atomic.atomic_write`, so a
  kill (or a full disk) during a write never replaces the last good checkpoint.
- `RandomState` saves the global random number generators (torch, CUDA, numpy, python) in each
  checkpoint and restores them on resume. The data loaders draw nothing from them (their order
  and augmentation are seeded by epoch and index, see `finetune.data.EpochSampler`), so a
  resumed run continues with exactly the random numbers an uninterrupted run would have used.
- `resolve_checkpoint` turns `ckpt_path=last` or a run dir into a checkpoint file, and refuses a
  checkpoint of another experiment (other classes, another model) with a message that points
  to the weights-loading path (`model.weights=...`) instead.
- `command_line` makes `python train.py hydra.run.dir=D ckpt_path=last` continue D with D's own
  config: the run's saved overrides come first, the new ones on top, and a new one that the
  checkpoint cannot follow (another model, data, strategy, seed...) is refused before Hydra
  starts. `config_changes` names what the new overrides change; `train()` logs each one.
- A resume in place rewrites none of the run's files (config, .hydra/, classes): a refused or
  failed resume leaves the run dir as it was (`ResumeRefused`). Refused too: a config asking
  for no epoch beyond those trained (`check_epochs`), and data whose splits are not the run's
  split.json (`check_split`). What Ctrl-C prints: `finetune.interrupt`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.atomic import DiskFullError, atomic_write
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint written with `finetune.atomic.atomic_write`: beside the target, then
    renamed over it. A full disk or unwritable folder is a `FinetuneError` naming the fix."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        try:
            atomic_write(path, lambda handle: torch.save(checkpoint, handle))
        except (OSError, DiskFullError) as error:
            full = isinstance(error, DiskFullError) or error.errno == errno.ENOSPC
            reason = "the disk is full" if full else f"{error.strerror}: {error}"
            raise FinetuneError(
                f"Could not write the checkpoint {path} ({reason}). The checkpoints written "
                f"before are intact in {path.parent}. Fix: free space or make the run dir "
                f"writable, then {how_to_continue(path.parent)}"
            ) from error


def how_to_continue(checkpoints: Path) -> str:
    """How to continue a run whose checkpoints lie in `checkpoints` (its run dir's
    checkpoints/): from last.ckpt, else from the newest checkpoint there, else from the start."""
    run_dir = checkpoints.parent
    if (checkpoints / "last.ckpt").is_file():
        return f"resume with hydra.run.dir={run_dir} ckpt_path=last."
    written = sorted(checkpoints.glob("*.ckpt"), key=lambda file: file.stat().st_mtime)
    if written:
        return f"resume with hydra.run.dir={run_dir} 'ckpt_path={written[-1]}'."
    return "run the same command again."


class RandomState(pl.Callback):
    """Global RNG states in every checkpoint, restored when a run resumes from it."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            # plain types and tensors only: checkpoints load with weights_only=True
            "numpy": [kind, torch.from_numpy(keys.copy()), position, has_gauss, cached_gaussian],
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, position, has_gauss, cached_gaussian = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy(), position, has_gauss, cached_gaussian))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ResumedDataOrder(pl.Callback):
    """A resumed run's first epoch draws that epoch's data order and augmentation, not epoch
    0's. Lightning creates the training iterator while `configure_optimizers` estimates the
    steps (`trainer.estimated_stepping_batches`), before it restores the loops from the
    checkpoint and before it calls the sampler's `set_epoch`; with worker processes that
    iterator has already drawn epoch 0's first keys (Lightning issue #21938). On a resume the
    training loader is therefore made again at the start of the first epoch, after the
    restore, where the data module's sampler starts at the restored epoch."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fit_loop.epoch_progress.current.processed > 0:
            # FitLoop.setup_data rebuilds the loader, its fetcher and its iterator when unset
            trainer.fit_loop._combined_loader = None


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` (this run dir's last checkpoint), a run dir (its last checkpoint) or a file."""
    if ckpt_path in (None, "", "null"):
        return None
    candidate = run_dir if ckpt_path == "last" else Path(str(ckpt_path)).expanduser()
    if candidate.is_dir():
        candidate = candidate / "checkpoints" / "last.ckpt"
    if not candidate.is_file():
        hint = (
            "ckpt_path=last resumes the run in hydra.run.dir: pass the interrupted run's folder "
            "as hydra.run.dir=outputs/runs/<run>"
            if ckpt_path == "last"
            else "point ckpt_path at a .ckpt file or at a run dir with checkpoints/last.ckpt"
        )
        failure = candidate.parent.parent / "failure.json"
        if candidate.name == "last.ckpt" and failure.is_file():
            hint = (
                f"that run failed before its first checkpoint ({failure} says why); run it "
                "again without ckpt_path"
            )
        raise FinetuneError(f"No checkpoint to resume from at {candidate}. Fix: {hint}.")
    return str(candidate)


def check_compatible(
    checkpoint_path: str, class_names: list[str], model_name: str, auto_lr: float | None = None
) -> None:
    """Refuse to resume from a checkpoint of a different experiment, before Lightning fails with
    a wall of size-mismatch errors; and (`ResumeRefused`) at `auto_lr`, the rate lr=auto chose
    for this resume, when the checkpoint trained at another (`check_learning_rate`)."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, not a checkpoint, pickled code...
        raise FinetuneError(
            f"Cannot read the checkpoint {checkpoint_path} ({type(error).__name__}: {error}). "
            "Fix: resume from another checkpoint (checkpoints/last.ckpt or the best one)."
        ) from error
    hparams = checkpoint.get("hyper_parameters") or {}
    saved_classes = list(hparams.get("class_names") or [])
    saved_model = (hparams.get("model") or {}).get("name")
    problems = []
    if saved_model and saved_model != model_name:
        problems.append(f"it holds a {saved_model}, this run builds a {model_name}")
    if saved_classes and saved_classes != list(class_names):
        problems.append(
            f"it was trained for {len(saved_classes)} classes ({', '.join(saved_classes[:5])}"
            f"{'...' if len(saved_classes) > 5 else ''}), this run has {len(class_names)} "
            f"({', '.join(class_names[:5])}{'...' if len(class_names) > 5 else ''})"
        )
    if problems:
        raise FinetuneError(
            f"Cannot resume from {checkpoint_path}: {'; '.join(problems)}. ckpt_path continues "
            "the same experiment. Fix: to start a new run from those weights, use "
            f"model.weights={checkpoint_path} (loaded bottom-up: every layer that fits, up to "
            "the first that does not), or resume with the original model and data."
        )
    if auto_lr is not None:
        check_learning_rate(hparams, auto_lr, checkpoint_path)


def check_learning_rate(hparams: dict[str, Any], lr: float, checkpoint_path: str) -> None:
    """Refuse (`ResumeRefused`) to continue a checkpoint (its `hparams`) at an `auto` learning
    rate `lr` other than it trained at: the rule scales the rate with the images per optimizer
    step, which a resume on another number of processes changes."""
    optim = hparams.get("optim") or {}
    trained = (optim.get("optimizer") or {}).get("lr")
    if trained is None or math.isclose(float(trained), float(lr), rel_tol=1e-6):
        return
    raise ResumeRefused(
        f"Cannot resume {checkpoint_path} at optim.optimizer.lr={lr:g}: the run trained at "
        f"{float(trained):g}, and lr=auto scales with the images of one optimizer step, which "
        "the number of processes (trainer.devices x trainer.num_nodes) or "
        "trainer.accumulate_grad_batches changed. Fix: resume with the run's devices, or add "
        f"optim.optimizer.lr={float(trained):g} (and the run's data.batch_size) to the command."
    )


# --- resuming with the run's own config ------------------------------------------------------------

# Keys a resume may change: how and how long the run trains, not what it learns. A prefix ending
# in "." covers its subtree. Everything else (model, data, strategy, optim, scheduler, seed,
# the other callbacks, batch size, accumulation...) is what the checkpoint was trained with.
RESUMABLE_CHANGES = (
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.precision",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.num_sanity_val_steps",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.eval_batch_size",
    "data.decode_cache_mb",
    "data.cache_dir",
    "paths.cache_dir",  # the caches hold what can be computed again
    "callbacks.progress_bar.",
    "logger.",
    "speed.",
    "print_config",
    # where the head started: a resume starts from its checkpoint's head, whatever the value
    "strategy.head_init",
)
# Not part of the experiment: where it runs and what it resumes from.
_NOT_COMPARED = ("run_dir", "ckpt_path")
SAVED_OVERRIDES = Path(".hydra") / "overrides.yaml"


class ResumeRefused(FinetuneError):
    """A resume that stopped before training; the run dir is as it was."""


def source_run_dir(ckpt_path: Any, run_dir: Path) -> Path | None:
    """The run dir whose checkpoint `ckpt_path` names (`last`: `run_dir`; a run dir; a file in
    a run's checkpoints/), when it holds a saved config.yaml; None otherwise."""
    if ckpt_path in (None, "", "null"):
        return None
    path = run_dir if ckpt_path == "last" else Path(str(ckpt_path)).expanduser()
    if path.is_file() and path.parent.name == "checkpoints":
        path = path.parent.parent
    return path if (path / "config.yaml").is_file() else None


def is_in_place(ckpt_path: Any, run_dir: Path) -> bool:
    """Whether `ckpt_path` continues the run of `run_dir` itself (whose files stay as they are)."""
    source = source_run_dir(ckpt_path, run_dir)
    return source is not None and source.resolve() == run_dir.resolve()


# The saved value of a key the run's config does not have: the key was added to the project
# after the run was made.
ABSENT = "<not in the run's config>"


def config_changes(saved: DictConfig, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, value now) for every value of `cfg` that differs from the
    run's `saved` config (both resolved; `run_dir`, `ckpt_path` and `hydra` not compared); a
    key the saved config lacks has the saved value ABSENT."""
    now = _flat(cfg, str(saved.run_dir))  # ${run_dir} resolves alike in both
    before = _flat(saved, str(saved.run_dir))
    keys = [k for k in {**before, **now} if k.split(".")[0] not in _NOT_COMPARED]
    changed = [k for k in keys if k not in before or before[k] != now.get(k)]
    return {k: (before.get(k, ABSENT), now.get(k)) for k in changed}


def _flat(cfg: DictConfig, run_dir: str) -> dict[str, Any]:
    """`cfg` resolved and flattened to dotted keys, without `hydra`, at `run_dir`."""
    from finetune.rundir import flatten

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.run_dir = run_dir
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def check_changes(
    changes: dict[str, tuple[Any, Any]],
    source: Path,
    typed: Sequence[str] = (),
    typed_changes: Collection[str] = (),
) -> None:
    """`ResumeRefused` naming every change the checkpoint of `source` cannot follow, those of
    the keys in the `typed` overrides (or in `typed_changes`, the keys they change through
    interpolations: paths.data_root changes data.root) first, and the overrides that caused
    them."""

    def allowed(key: str) -> bool:
        # a subtree prefix covers the key itself too: callbacks.progress_bar=null
        return any(
            key == k or (k.endswith(".") and (key.startswith(k) or key == k[:-1]))
            for k in RESUMABLE_CHANGES
        )

    def was_typed(key: str) -> bool:
        keys = [*map(_key, typed), *typed_changes]
        return any(key == t or key.startswith(f"{t}.") for t in keys)

    refused = {key: values for key, values in changes.items() if not allowed(key)}
    if refused:
        listed = "; ".join(
            f"{k}: {old!r} in the run, {new!r} now"
            for k, (old, new) in sorted(refused.items(), key=lambda item: not was_typed(item[0]))
        )
        # the typed overrides a resume could not follow (print_config=false it can)
        guilty = [line for line in typed if not allowed(_key(line))] or list(typed)
        cause = f" (the overrides {' '.join(guilty)} change)" if guilty else ""
        # Keys nobody typed changed because the project's defaults (or an environment variable
        # they read) changed since the run: pinning the run's values resumes it as it was.
        untyped = [
            f"{k}={old}"
            for k, (old, _) in refused.items()
            if not was_typed(k) and old is not None and old != ABSENT
        ]
        hint = (
            f" The defaults (or the environment variables they read) changed since the run "
            f"was made: add {' '.join(untyped)} to the command to resume with the run's values."
            if untyped
            else ""
        )
        # (a key the typed overrides brought, e.g. the keys of another strategy, is no news)
        added = [k for k, (old, _) in refused.items() if old == ABSENT and not was_typed(k)]
        if added:
            hint += (
                f" The run was made before {', '.join(added)} existed: its checkpoint was "
                "trained without it, and this version cannot continue it."
            )
        raise ResumeRefused(
            f"Cannot resume {source} with this config{cause}: {listed}.{hint} A resume continues "
            "the run with its own config (saved in config.yaml); only how and how long it trains may "
            "change (e.g. trainer.max_epochs, trainer.devices, data.num_workers). Fix: drop "
            "those overrides, or start a new run from the checkpoint's weights with "
            f"model.weights={source / 'checkpoints' / 'last.ckpt'} and another hydra.run.dir."
        )


def check_config(cfg: DictConfig, run_dir: Path) -> None:
    """When `cfg.ckpt_path` names a run with a saved config: refuse changes its checkpoint
    cannot follow (`ResumeRefused`), log each one that is applied."""
    source = source_run_dir(cfg.get("ckpt_path"), run_dir)
    if source is None:
        return
    changes = config_changes(OmegaConf.load(source / "config.yaml"), cfg)
    check_changes(changes, source)
    for key, (old, new) in changes.items():
        log.info("Resume of %s: %s changed from %r to %r", source, key, old, new)


def command_line(argv: Sequence[str]) -> list[str]:
    """`argv` of `python train.py` with the resumed run's saved overrides put first, so that
    `hydra.run.dir=D ckpt_path=last` alone continues D with D's config; the new overrides win.
    A resume in place adds `hydra.output_subdir=null` (Hydra then leaves D/.hydra/ as it is).
    Other command lines come back unchanged. Raises `ResumeRefused` (before Hydra starts, so
    nothing is written) for a new override the checkpoint cannot follow."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from finetune.config import ConfigError, check_overrides

    args = get_args_parser().parse_args(list(argv))
    if args.multirun or args.overrides != list(argv):  # flags: Hydra's business, as typed
        return list(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # Hydra's own message explains a malformed override
        return list(argv)
    given = {o.key_or_group: o.value() for o in parsed if not o.is_sweep_override()}
    run_dir = Path(str(given["hydra.run.dir"])) if "hydra.run.dir" in given else None
    ckpt_path = given.get("ckpt_path")
    source = source_run_dir(ckpt_path, run_dir or Path.cwd() / "_no_run_dir")
    if source is None and ckpt_path not in (None, "", "null"):
        # refused here, before Hydra makes a run dir and the data is listed (or downloaded)
        if ckpt_path == "last" and run_dir is None:
            raise ResumeRefused(
                "ckpt_path=last resumes the run in hydra.run.dir, and none was given. Fix: add "
                "hydra.run.dir=outputs/runs/<run> (the interrupted run's folder)."
            )
        resolve_checkpoint(ckpt_path, run_dir or Path.cwd())
    if source is None or not (source / SAVED_OVERRIDES).is_file():
        return list(argv)
    # first: a run without a checkpoint (it failed before one) has nothing to resume, whatever
    # the overrides say (the config check below would blame them and name the missing file)
    checkpoint = resolve_checkpoint(ckpt_path, run_dir or source)
    saved = yaml.safe_load((source / SAVED_OVERRIDES).read_text()) or []
    keys = {*given, "ckpt_path"}
    kept = [line for line in saved if _key(line) not in keys]
    tail = list(argv)
    in_place = run_dir is not None and run_dir.resolve() == source.resolve()
    if in_place and "hydra.output_subdir" not in given:
        tail.append("hydra.output_subdir=null")
    try:
        try:
            cfg = check_overrides(kept + tail)
        except (ConfigError, HydraException) as error:  # a saved override the new ones exclude
            fitting = _fitting(kept, tail, check_overrides)  # (data.synthetic.* with data=...)
            try:
                cfg = check_overrides(fitting + tail)
            except (ConfigError, HydraException):  # a wrong new value: said of the run's config
                raise error from None
            kept = fitting
    except HydraException:  # Hydra says it again, in its words, as it starts
        return list(argv)
    typed = [line for line in argv if _key(line) not in ("hydra.run.dir", "ckpt_path")]
    changes = config_changes(OmegaConf.load(source / "config.yaml"), cfg)
    check_changes(changes, source, typed, _changed_by(typed, kept + tail, cfg, check_overrides))
    from finetune.run import training_regime  # run imports this module

    solved = training_regime(cfg) == "probe"
    check_epochs(checkpoint, cfg.trainer.get("max_epochs"), source, probe_solved=solved)
    return kept + tail


def _changed_by(typed: list[str], overrides: list[str], cfg: DictConfig, compose: Any) -> set[str]:
    """The keys of `cfg` (composed from `overrides`) that the `typed` ones change, through
    interpolations too; empty when the config does not compose without them."""
    from hydra.errors import HydraException

    from finetune.config import ConfigError

    if not typed:
        return set()
    try:
        without = compose([line for line in overrides if line not in typed])
    except (ConfigError, HydraException):
        return set()
    before, now = _flat(without, ""), _flat(cfg, "")
    return {key for key in {*before, *now} if before.get(key, ABSENT) != now.get(key, ABSENT)}


def _fitting(saved: list[str], new: list[str], compose: Any) -> list[str]:
    """The saved overrides, in order, that still compose with the `new` ones: a change the new
    ones cause is then theirs alone, not the defaults of a dropped saved override."""
    from hydra.errors import HydraException

    from finetune.config import ConfigError

    fitting: list[str] = []
    for line in saved:
        with contextlib.suppress(ConfigError, HydraException):
            compose([*fitting, line, *new])
            fitting.append(line)
    return fitting


def trained_epochs(checkpoint_path: str | Path) -> int:
    """How many epochs the run of `checkpoint_path` has finished (Lightning's epoch progress,
    which a resume restores as `current_epoch`)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", checkpoint.get("epoch", -1) + 1))


def check_epochs(
    checkpoint_path: str | Path,
    max_epochs: int | str | None,
    source: Path,
    probe_solved: bool = False,
) -> None:
    """`ResumeRefused` when `max_epochs` asks for no epoch beyond those the checkpoint has
    trained (Lightning would stop with a traceback after writing logs); None or -1: no limit;
    `auto`: not known before the data is (run.train checks the value `finetune.adaptive` chose).
    `probe_solved`: the run's head is the linear probe solved on cached features, whose epochs
    change nothing, so the fix offered is another strategy, not more epochs."""
    if not isinstance(max_epochs, int) or max_epochs < 0:
        return
    trained = trained_epochs(checkpoint_path)
    if max_epochs > trained:
        return
    if max_epochs == trained and _unfinished(source):
        return  # stopped (Ctrl-C) after its last epoch, before its results: the resume ends it
    if probe_solved:
        raise ResumeRefused(
            f"Nothing to resume: the run {source} is the linear probe solved on cached "
            f"features, complete after its {trained} epoch(s); more epochs would change "
            "nothing. Fix: to train on from it, start a new run with strategy=lp_ft (every "
            "layer fine-tunes from the probe) or strategy.cache_features=false (the head "
            "trains on by SGD over augmented images)."
        )
    raise ResumeRefused(
        f"Nothing to resume: the run {source} has trained {trained} epoch(s) and this "
        f"config asks for trainer.max_epochs={max_epochs}. Fix: to train it longer, add "
        f"trainer.max_epochs=N with N > {trained} (e.g. trainer.max_epochs={trained + 1})."
    )


def _unfinished(source: Path) -> bool:
    """Whether `source` (a run dir, or a checkpoint in a run's checkpoints/) is a run that has
    not written its results (metrics.json)."""
    from finetune.rundir import METRICS_FILE

    run = source_run_dir(str(source), source)
    return run is not None and not (run / METRICS_FILE).is_file()


def check_split(ckpt_path: Any, run_dir: Path, record: dict[str, Any]) -> None:
    """`ResumeRefused` when the splits the data gives now (`record`, as
    `FinetuneDataModule.split_record()` makes it) are not the ones the resumed run recorded in
    its split.json: the same files, in the same split and class. A run without split.json, or
    no resume, passes."""
    from finetune.rundir import SPLIT_FILE

    source = source_run_dir(ckpt_path, run_dir)
    if source is None or not (source / SPLIT_FILE).is_file():
        return
    saved = _placement(json.loads((source / SPLIT_FILE).read_text()).get("files") or {})
    now = _placement(record["files"])
    missing = [path for path in saved if path not in now]
    added = [path for path in now if path not in saved]
    moved = [path for path in saved if path in now and saved[path] != now[path]]
    if not (missing or added or moved):
        return
    found = [
        f"{len(paths)} {what} (e.g. {paths[0]})"
        for paths, what in (
            (missing, "files of the run are missing"),
            (added, "files are new"),
            (moved, "files moved to another split or class"),
        )
        if paths
    ]
    raise ResumeRefused(
        f"Cannot resume {source}: the data is not the data it trained on ({'; '.join(found)}; "
        f"the run's splits are in {source / SPLIT_FILE}). A resume must see the same files in "
        "the same splits, or its metrics would mix two splits. Fix: restore the files as they "
        "were, or start a new run from the checkpoint's weights with "
        f"model.weights={source / 'checkpoints' / 'last.ckpt'} and another hydra.run.dir."
    )


def _placement(files: dict[str, dict[str, list[str]]]) -> dict[str, tuple[str, str]]:
    """split.json's `files` (split -> class -> paths) as path -> (split, class)."""
    return {
        path: (split, name)
        for split, by_class in files.items()
        for name, paths in by_class.items()
        for path in paths
    }


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")
