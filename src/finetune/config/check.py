"""Refuse a wrong key, type or option before anything runs, with one message that names the key,
its valid siblings and the closest match.

Hydra composes the config before the task function runs and creates the run dir as it starts
it; its own errors ("Could not override 'strategy.kk'") name neither the valid keys nor a fix,
and a key added with `+` to a schema node is accepted silently. `check_command_line(argv)`
composes what `python train.py ARGV` would compose (once per value of each sweep) and raises
`ConfigError` instead; `validate(cfg)` checks a composed config against the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import typing
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser @hydra.main itself uses
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    ValidationError,
)

from finetune.config.schema import SCHEMAS
from finetune.errors import FinetuneError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
SCHEMA_PREFIX = "base_"  # ConfigStore entries that option files extend, not options to choose


class ConfigError(FinetuneError):
    """An unknown key, option or a wrong type in the composed config."""


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
            explained = _missing_option(error)
            if explained is None:
                raise
            raise explained from None
        except ConfigCompositionException as error:
            explained = _explain(error, list(overrides), config_name)
            if explained is None:
                raise
            raise explained from None
    with open_dict(cfg):
        choices = dict(cfg.pop("hydra").runtime.choices)
    parser = OverridesParser.create()
    unset = [o.key_or_group for o in parser.parse_overrides(list(overrides)) if o.value() == "???"]
    validate(cfg, choices, unset if placeholders else ())
    return cfg


def validate(
    cfg: DictConfig, choices: dict[str, Any] | None = None, unset_ok: Collection[str] = ()
) -> None:
    """`ConfigError` for a key the schema does not have (added with `+`), a required key left
    without a value (`???`), or a value outside the values and types a key's schema field lists
    (`schema.one_of`). `choices`: the option chosen per group (Hydra's
    `hydra.runtime.choices`), for the message; `unset_ok`: keys that may stay `???`."""
    for path, node in _schema_nodes(cfg):
        fields = {f.name: f for f in dataclasses.fields(OmegaConf.get_type(node))}
        for key in node:
            if key not in fields:
                error = _unknown_key(_join(path, str(key)), list(fields), choices or {})
                raise ConfigError(f"{error} Keys of the schema cannot be added with `+`.")
        for name in fields:
            full_key = _join(path, name)
            if OmegaConf.is_missing(node, name):
                if full_key in unset_ok:
                    continue
                chosen = (choices or {}).get(path)
                needs = f" (`{path}={chosen}` needs it)" if chosen else ""
                raise ConfigError(
                    f"Config key `{full_key}` has no value{needs}. Fix: add {full_key}=..."
                )
            allowed = _allowed(OmegaConf.get_type(node), name)
            if allowed and not OmegaConf.is_interpolation(node, name):
                _check_value(full_key, node[name], allowed)


def _allowed(schema: type, name: str) -> dict[str, Any] | None:
    """The `one_of` metadata of field `name`, also when a subclass redeclares the field only
    to change its default (`name: str = "cosine"`)."""
    for cls in schema.__mro__:
        if dataclasses.is_dataclass(cls):
            spec = {f.name: f for f in dataclasses.fields(cls)}.get(name)
            if spec is not None and "choices" in spec.metadata:
                return spec.metadata
    return None


def _check_value(full_key: str, value: Any, allowed: dict[str, Any]) -> None:
    """`ConfigError` unless `value` is one of `allowed["choices"]` (same type too) or an
    instance of `allowed["types"]`."""
    values, types = allowed["choices"], allowed.get("types", ())
    if isinstance(value, ListConfig):
        value = list(value)
    if any(type(value) is type(a) and value == a for a in values):
        return
    if allowed.get("scale_range"):
        _check_scale_range(full_key, value)
        return
    if types and isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        _check_range(full_key, value, allowed)
        return
    named = list(dict.fromkeys(_show(a) for a in values))  # 64 and "64" read the same
    shown = named + [f"any {t.__name__}" for t in types]
    message = f"`{full_key}={_show(value)}` is not one of: {', '.join(shown)}."
    if types:  # a key of mixed type (auto or an int): the value is of the wrong type
        message = f"Config key `{full_key}` takes {', '.join(shown)}; not `{_show(value)}`."
    closest = difflib.get_close_matches(_show(value), named, n=1)
    example = closest[0] if closest else (shown[0] if values else _example(types[0]))
    if closest:
        message += f" Did you mean `{closest[0]}`?"
    raise ConfigError(f"{message} Fix: e.g. {full_key}={example}.")


def _check_range(full_key: str, value: float, allowed: dict[str, Any]) -> None:
    """`ConfigError` unless `value` is within the metadata's `minimum`, `maximum`, `above` and
    `below`."""
    bounds = ("minimum", "maximum", "above", "below")
    minimum, maximum, above, below = (allowed.get(k) for k in bounds)
    if minimum is not None and value < minimum:
        wrong = f"is below its minimum {_show(minimum)}"
    elif above is not None and value <= above:
        wrong = f"must be above {_show(above)}"
    elif maximum is not None and value > maximum:
        wrong = f"is above its maximum {_show(maximum)}"
    elif below is not None and value >= below:
        wrong = f"must be below {_show(below)}"
    else:
        return
    values = allowed["choices"]
    example = allowed.get("example")
    if example is None:
        example = values[0] if values else minimum if minimum is not None else maximum
    raise ConfigError(
        f"Config key `{full_key}={_show(value)}` {wrong}. Fix: e.g. {full_key}={_show(example)}."
    )


def _check_scale_range(full_key: str, value: Any) -> None:
    """`ConfigError` unless `value` is `[lo, hi]` with 0 < lo <= hi <= 1 (an area share)."""
    numbers = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    if numbers and len(value) == 2 and 0 < value[0] <= value[1] <= 1:
        return
    raise ConfigError(
        f"Config key `{full_key}={_show(value)}` must be [lo, hi] with 0 < lo <= hi <= 1 (the "
        f"share of the image a random crop covers). Fix: e.g. {full_key}=[0.08,1.0]."
    )


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


# ---------------------------------------------------------------------------------------------
# messages


def _explain(
    error: ConfigCompositionException, overrides: list[str], config_name: str
) -> ConfigError | None:
    """One message for Hydra's "Could not override" / "Error merging override" (or an option
    file's bad key), from the OmegaConf error under it."""
    cause = error.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key:  # an element of a list (`crop_scale[1]`): the key is the list's
        full_key = re.sub(r"\[\d+\]$", "", full_key)
    guilty = _override_for(full_key, overrides) if full_key else None
    if isinstance(cause, ConfigTypeError) and guilty and guilty.startswith("~"):
        return ConfigError(
            f"Config key `{full_key}` cannot be deleted: every key of the schema keeps a value. "
            f"Fix: set it instead ({full_key}=...)."
        )
    if not full_key or not isinstance(
        cause, ConfigAttributeError | ConfigKeyError | ValidationError
    ):
        return None
    rest = [line for line in overrides if line != guilty]
    try:  # the config without the bad override: its keys are the valid siblings
        base = compose(config_name, overrides=rest, return_hydra_config=True)
    except HydraException:
        return None
    choices = dict(base.hydra.runtime.choices)
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.select(base, parent) if parent else base
    siblings = [str(key) for key in node if key != "hydra"] if isinstance(node, DictConfig) else []
    if isinstance(cause, ValidationError):
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        return _wrong_type(full_key, cause, guilty, schema)
    if full_key.split(".", 1)[0] == "hydra":
        return None  # Hydra's own settings: its message stands
    return _unknown_key(full_key, siblings, choices)


def _override_for(full_key: str, overrides: list[str]) -> str | None:
    """The override that sets `full_key` or a key below it."""
    parser = OverridesParser.create()
    for line in overrides:
        key = parser.parse_override(line).key_or_group
        if key == full_key or key.startswith(full_key + "."):
            return line
    return None


def _unknown_key(full_key: str, siblings: list[str], choices: dict[str, Any]) -> ConfigError:
    parent, _, name = full_key.rpartition(".")
    where = (
        f"{parent} ({parent}={choices[parent]})" if parent in choices else parent or "the top level"
    )
    message = f"Unknown config key `{full_key}`. Valid keys of {where}: {', '.join(siblings)}."
    closest = difflib.get_close_matches(name, siblings, n=1)
    elsewhere = _in_other_options(parent, name, choices.get(parent))
    if closest:
        message += f" Did you mean `{closest[0]}`?"
    elif elsewhere:
        message += f" {elsewhere}"
    if parent in ("callbacks", "logger"):
        owners = _entry_in_option_files(parent, name, choices.get(parent))
        if owners:
            message += (
                f" `{name}` is an entry of {', '.join(f'{parent}={o}' for o in owners)}. "
                f"Fix: add {parent}={owners[0]} to the command line."
            )
        else:
            message += f" A new {parent} entry is added with `+{full_key}=...` as a _target_ map."
    return ConfigError(message)


def _entry_in_option_files(group: str, name: str, chosen: Any) -> list[str]:
    """The options of `group` (conf/<group>/*.yaml, no schema) other than `chosen` whose file
    has a top-level entry `name`, e.g. callbacks=early_stopping for `early_stopping`."""
    owners = []
    for option_file in sorted((CONF_DIR / group).glob("*.yaml")):
        entries = OmegaConf.load(option_file)
        if option_file.stem != chosen and isinstance(entries, DictConfig) and name in entries:
            owners.append(option_file.stem)
    return owners


def _in_other_options(group: str, name: str, chosen: Any) -> str | None:
    """`k` of strategy=top_k, when `name` is (or is close to) a key of other options of
    `group`: the options that have it and how to choose one."""
    owners: dict[str, list[str]] = {}
    for schema_name, schema in SCHEMAS.get(group, {}).items():
        option = schema_name.removeprefix(SCHEMA_PREFIX)
        keys = [f.name for f in dataclasses.fields(schema)]
        match = difflib.get_close_matches(name, keys, n=1)
        if match and option != chosen:
            owners.setdefault(match[0], []).append(option)
    if not owners:
        return None
    key = name if name in owners else next(iter(owners))
    options = owners[key]
    where = ", ".join(f"{group}={option}" for option in options)
    fix = f"`{group}={options[0]} {group}.{key}=...`"
    if key == name:  # the user typed the key right, in the wrong option
        return f"`{key}` is a key of {where}, not of {group}={chosen}: {fix}."
    return f"Did you mean `{key}`? It is a key of {where}: {fix}."


def _wrong_type(
    full_key: str, cause: ValidationError, guilty: str | None, schema: type | None
) -> ConfigError:
    """`schema`: the dataclass of the key's parent node (the error's own `object_type` is the
    list for a wrong list element)."""
    if guilty:
        value = OverridesParser.create().parse_override(guilty).get_value_element_as_str()
    else:
        value = cause.value
    if not dataclasses.is_dataclass(schema):
        schema = cause.object_type
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    expected = hints.get(full_key.rpartition(".")[2])
    if dataclasses.is_dataclass(expected):
        return _not_a_value(full_key, str(value), expected)
    if typing.get_origin(expected) is list:
        item = typing.get_args(expected)[0]
        return ConfigError(
            f"Wrong type for config key `{full_key}`: it takes a list of {item.__name__}, not "
            f"`{value}`. Fix: e.g. {full_key}=[{_example(item)},{_example(item)}]."
        )
    shown = getattr(expected, "__name__", None) or str(expected or "another type")
    return ConfigError(
        f"Wrong type for config key `{full_key}`: it takes {shown}, not `{value}`. "
        f"Fix: e.g. {full_key}={_example(expected)}."
    )


def _not_a_value(full_key: str, value: str, schema: type) -> ConfigError:
    """`data.augment=none`: a node set like a value; an option of the group of that name
    (augment=none) is what the user meant."""
    keys = [f.name for f in dataclasses.fields(schema)]
    message = (
        f"`{full_key}` is a group of keys ({', '.join(keys)}), not a value, so "
        f"`{full_key}={value}` cannot be set."
    )
    group = full_key.rpartition(".")[2]
    options = _group_options(group)
    if value in options:
        return ConfigError(f"{message} Fix: choose the option with `{group}={value}`.")
    if options:
        message += f" Choose an option with `{group}=NAME` ({', '.join(options)}), or"
    return ConfigError(f"{message} set one key, e.g. `{full_key}.{keys[0]}=...`.")


def _missing_option(error: MissingConfigException) -> ConfigError | None:
    """`strategy=topk`: the group's options and the closest one."""
    if not error.missing_cfg_file or not error.options:
        return None
    group, _, option = error.missing_cfg_file.rpartition("/")
    options = [name for name in error.options if not name.startswith(SCHEMA_PREFIX)]
    message = f"No option `{option}` in config group `{group}`. Options: {', '.join(options)}."
    closest = difflib.get_close_matches(option, options, n=1)
    if closest:
        message += f" Did you mean `{group}={closest[0]}`?"
    return ConfigError(message)


def _group_options(group: str) -> list[str]:
    try:
        options = GlobalHydra.instance().config_loader().get_group_options(group)
    except HydraException:
        options = []
    return [name for name in options if not name.startswith(SCHEMA_PREFIX)]


def _schema_nodes(node: DictConfig, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every node typed by a schema dataclass, with its dotted path."""
    if dataclasses.is_dataclass(OmegaConf.get_type(node)):
        yield path, node
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from _schema_nodes(child, _join(path, str(key)))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _example(expected: Any) -> str:
    """A value of the expected type, for the fix."""
    kinds = typing.get_args(expected) or (expected,)
    examples = {int: "10", float: "0.5", bool: "true", str: "text", list: "[0,1]"}
    return next((examples[kind] for kind in kinds if kind in examples), "null")
