"""Check a composed config, or a config built in code, against the schema: unknown keys,
missing values and values outside a key's `one_of` metadata (`finetune.config.values`)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from finetune.config.messages import ConfigError, example_value, show, unknown_key


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
                error = unknown_key(_join(path, str(key)), list(fields), choices or {})
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


def check_fields(values: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """`ConfigError` for a value of `values` (a config built in code, a constructor's keyword
    arguments) outside the `one_of` metadata of the field of `schema` it sets, worded as the
    command-line check words it (`prefix`: the group, e.g. "data", for the key's full name).
    Keys the schema lacks, and `???` values, are left to the caller."""
    for spec in dataclasses.fields(schema):
        allowed = _allowed(schema, spec.name)
        if not allowed or spec.name not in values or _is_missing(values, spec.name):
            continue
        _check_value(_join(prefix, spec.name), values[spec.name], allowed)


def _is_missing(values: Mapping[str, Any], key: str) -> bool:
    if isinstance(values, DictConfig):
        return OmegaConf.is_missing(values, key)
    return values[key] == MISSING


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
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    if any(type(value) is type(a) and value == a for a in values):
        return
    if allowed.get("scale_range"):
        _check_scale_range(full_key, value)
        return
    if types and isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        _check_range(full_key, value, allowed)
        return
    named = list(dict.fromkeys(show(a) for a in values))  # 64 and "64" read the same
    shown = named + [f"any {t.__name__}" for t in types]
    message = f"`{full_key}={show(value)}` is not one of: {', '.join(shown)}."
    if types:  # a key of mixed type (auto or an int): the value is of the wrong type
        message = f"Config key `{full_key}` takes {', '.join(shown)}; not `{show(value)}`."
    closest = difflib.get_close_matches(show(value), named, n=1)
    example = closest[0] if closest else (shown[0] if values else example_value(types[0]))
    if closest:
        message += f" Did you mean `{closest[0]}`?"
    raise ConfigError(f"{message} Fix: e.g. {full_key}={example}.")


def _check_range(full_key: str, value: float, allowed: dict[str, Any]) -> None:
    """`ConfigError` unless `value` is within the metadata's `minimum`, `maximum`, `above` and
    `below`."""
    bounds = ("minimum", "maximum", "above", "below")
    minimum, maximum, above, below = (allowed.get(k) for k in bounds)
    if minimum is not None and value < minimum:
        wrong = f"is below its minimum {show(minimum)}"
    elif above is not None and value <= above:
        wrong = f"must be above {show(above)}"
    elif maximum is not None and value > maximum:
        wrong = f"is above its maximum {show(maximum)}"
    elif below is not None and value >= below:
        wrong = f"must be below {show(below)}"
    else:
        return
    values = allowed["choices"]
    example = allowed.get("example")
    if example is None:
        example = values[0] if values else minimum if minimum is not None else maximum
    raise ConfigError(
        f"Config key `{full_key}={show(value)}` {wrong}. Fix: e.g. {full_key}={show(example)}."
    )


def _check_scale_range(full_key: str, value: Any) -> None:
    """`ConfigError` unless `value` is `[lo, hi]` with 0 < lo <= hi <= 1 (an area share)."""
    numbers = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    if numbers and len(value) == 2 and 0 < value[0] <= value[1] <= 1:
        return
    raise ConfigError(
        f"Config key `{full_key}={show(value)}` must be [lo, hi] with 0 < lo <= hi <= 1 (the "
        f"share of the image a random crop covers). Fix: e.g. {full_key}=[0.08,1.0]."
    )


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
