"""Refuse a wrong key, type or option before anything runs, with one message that names the key,
its valid siblings and the closest match.

Hydra composes the config before the task function runs and creates the run dir as it starts
it; its own errors ("Could not override 'strategy.kk'") name neither the valid keys nor a fix,
and a key added with `+` to a schema node is accepted silently. `check_command_line(argv)`
composes what `python train.py ARGV` would compose (once per value of each sweep) and raises
`ConfigError` instead; `finetune.config.validate` checks the composed config against the schema
and `finetune.config.messages` words the refusals.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser @hydra.main itself uses
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, open_dict

from finetune.config.messages import (
    CONF_DIR,
    ConfigError,
    explain,
    missing_option,
    needs_quotes,
)
from finetune.config.validate import validate


def expand_home(argv: Sequence[str]) -> list[str]:
    """`key=~/photos` as a user types it: the shell leaves that `~` alone (`key` has a dot) and
    Hydra's parser refuses it, so a leading `~/` of a value is expanded here, as for a path.
    train.py, predict.py and export.py apply it to their command lines before anything else."""
    home = os.path.expanduser("~")
    return [re.sub(r"^(\+{0,2}[\w.@/-]+=)~(?=/|$)", lambda m: m.group(1) + home, a) for a in argv]


def check_command_line(
    argv: Sequence[str],
    config_dir: Path = CONF_DIR,
    config_name: str = "config",
    *,
    strict: bool = False,
    new_run: bool = False,
) -> None:
    """Compose what `python train.py ARGV` composes, with each value of each sweep, and raise
    `ConfigError` for the first unknown key, unknown option or wrong type; with `new_run` (a
    training run that resumes nothing), also for a `hydra.run.dir` that holds a run already.

    Leaves to Hydra what it explains well itself (help, a malformed override, another config
    dir): those return without a check. `strict` (the docs test): Hydra's own errors raise
    too (`HydraException`), and a value `???` on the command line stands for any value (a
    placeholder of the docs: the key must exist).
    """
    args = get_args_parser().parse_args(list(argv))
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    if args.config_path or args.config_dir or args.experimental_rerun:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException:
        quoting = needs_quotes(args.overrides)
        if quoting is not None:
            raise quoting from None
        if strict:
            raise
        return
    for variant in _variants(overrides):
        try:
            check_overrides(variant, config_dir, args.config_name or config_name, strict)
        except HydraException:  # not one of the mistakes above: Hydra's own message stands
            if strict:
                raise
            return
    for override in overrides:
        if override.key_or_group in ("hydra.run.dir", "hydra.sweep.dir"):
            _check_creatable(override.key_or_group, override.value())
        if new_run and not args.multirun and override.key_or_group == "hydra.run.dir":
            _check_new_run_dir(override.value())


def _check_new_run_dir(run_dir: Any) -> None:
    """`ConfigError` when the folder `run_dir` of a new run (not a resume) already holds a run's
    results or checkpoints. Hydra would rewrite its `.hydra/` (the overrides a resume reads) and
    append to its log, and the new run would mix its checkpoints and TensorBoard events with the
    old run's and replace its metrics.json. A folder with only a failed run's files
    (failure.json, a log) may be reused."""
    if not isinstance(run_dir, str) or "${" in run_dir:
        return
    folder = Path(run_dir).expanduser()
    held = ["metrics.json"] if (folder / "metrics.json").is_file() else []
    checkpoints = list((folder / "checkpoints").glob("*.ckpt"))
    if checkpoints:
        held.append(f"{len(checkpoints)} checkpoint(s)")
    if held:
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds a run ({', '.join(held)}); a new run there "
            "would mix its checkpoints and TensorBoard events with that run's and replace its "
            "results. Fix: choose a new hydra.run.dir, continue that run with ckpt_path=last, "
            "or delete the folder first."
        )


def _check_creatable(key: str, value: Any) -> None:
    """`ConfigError` when the folder `value` given to `key` could not be created or written:
    Hydra creates it before the run starts, with a traceback for a folder it cannot make."""
    if not isinstance(value, str) or "${" in value:
        return  # a sweep, or resolved by Hydra later (${now:...}): the run checks it
    folder = Path(value).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    else:
        try:  # a folder made and removed at once: os.access says yes to root everywhere
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".finetune-check-"))
            return
        except OSError as error:
            reason = f"no folder can be made in {existing} ({error.strerror})"
    raise ConfigError(
        f"Cannot create `{key}={value}`: {reason}. Fix: choose a writable folder with {key}=..."
    )


def check_overrides(
    overrides: Sequence[str],
    config_dir: Path = CONF_DIR,
    config_name: str = "config",
    placeholders: bool = False,
) -> DictConfig:
    """The config `overrides` compose to (without the hydra node); `ConfigError` when a key,
    option or type is wrong. `placeholders`: a key set to `???` need not get a value."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
        except MissingConfigException as error:
            explained = missing_option(error)
            if explained is None:
                raise
            raise explained from None
        except ConfigCompositionException as error:
            explained = explain(error, list(overrides), config_name)
            if explained is None:
                raise
            raise explained from None
    with open_dict(cfg):
        choices = dict(cfg.pop("hydra").runtime.choices)
    parser = OverridesParser.create()
    unset = [o.key_or_group for o in parser.parse_overrides(list(overrides)) if o.value() == "???"]
    validate(cfg, choices, unset if placeholders else ())
    return cfg


# ---------------------------------------------------------------------------------------------
# sweeps


def _variants(overrides: list[Override]) -> Iterator[list[str]]:
    """The overrides with the first value of every sweep, then each other value of one sweep
    at a time: every value is checked once, without the product of all sweeps."""
    values = [_values(override) for override in overrides]
    first = [options[0] for options in values]
    yield [line for line in first if line]
    for index, options in enumerate(values):
        for value in options[1:]:
            yield [line for line in (*first[:index], value, *first[index + 1 :]) if line]


def _values(override: Override) -> list[str]:
    """`key=value` lines for each value of `override`; '' for one that names group options
    by glob (they exist by construction)."""
    if not override.is_sweep_override():
        return [override.input_line or ""]
    key = override.get_key_element()
    if override.is_interval_sweep():  # a sampler's range (Optuna): its lower end has the type
        return [f"{key}={override.value().start}"]
    if override.is_choice_sweep() or override.is_range_sweep():
        return [f"{key}={value}" for value in override.sweep_string_iterator()]
    return [""]
