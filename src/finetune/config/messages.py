"""The messages that refuse a wrong key, option or type: the key, its valid siblings, the
option that has it, and the closest match ("did you mean")."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
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


def explain(
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
    return unknown_key(full_key, siblings, choices)


def _override_for(full_key: str, overrides: list[str]) -> str | None:
    """The override that sets `full_key` or a key below it."""
    parser = OverridesParser.create()
    for line in overrides:
        key = parser.parse_override(line).key_or_group
        if key == full_key or key.startswith(full_key + "."):
            return line
    return None


def unknown_key(full_key: str, siblings: list[str], choices: dict[str, Any]) -> ConfigError:
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
            f"`{value}`. Fix: e.g. {full_key}=[{example_value(item)},{example_value(item)}]."
        )
    shown = getattr(expected, "__name__", None) or str(expected or "another type")
    return ConfigError(
        f"Wrong type for config key `{full_key}`: it takes {shown}, not `{value}`. "
        f"Fix: e.g. {full_key}={example_value(expected)}."
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


def missing_option(error: MissingConfigException) -> ConfigError | None:
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


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def example_value(expected: Any) -> str:
    """A value of the expected type, for the fix."""
    kinds = typing.get_args(expected) or (expected,)
    examples = {int: "10", float: "0.5", bool: "true", str: "text", list: "[0,1]"}
    return next((examples[kind] for kind in kinds if kind in examples), "null")


def needs_quotes(overrides: Sequence[str]) -> ConfigError | None:
    """The refusal of the first override that Hydra's grammar cannot parse but can once its
    value is quoted (a path with `=`, `(`, `)`, a space...: `epoch=9-step=100.ckpt`,
    `My Photos (2024)`), showing the quoted form; None when there is none such."""
    parser = OverridesParser.create()
    for line in overrides:
        try:
            parser.parse_override(line)
            continue
        except HydraException:
            pass
        key, equals, value = line.partition("=")
        quote = '"' if "'" in value else "'"
        quoted = f"{key}={quote}{value}{quote}"
        if not equals or not value or (quote == '"' and '"' in value):
            continue
        try:
            parser.parse_override(quoted)
        except HydraException:
            continue
        shell = f"'{quoted}'" if quote == '"' else f'"{quoted}"'
        return ConfigError(
            f"The override {line} cannot be read: its value has characters that Hydra's "
            "command-line grammar reads as syntax (= ( ) [ ] { } , : spaces...). Fix: quote the "
            f"value for Hydra, and the whole override for the shell: {shell}"
        )
    return None
