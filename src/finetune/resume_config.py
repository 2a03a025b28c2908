"""A resume's config: the run's own saved config and overrides, and the changes a resume refuses.

`with_saved_overrides` makes `python train.py hydra.run.dir=D ckpt_path=last` continue D with
D's own config: the run's saved overrides come first, the new ones on top, and a new one that
the checkpoint cannot follow (another model, data, strategy, seed...) is refused before Hydra
starts (`ResumeRefused`: the run dir stays as it was). Which keys a resume may change is a
property of each key in the schema (`finetune.config.schema.RESUMABLE`); a key the run's saved
config lacks (added to the project since) takes its default, unless its field says a run made
before it cannot continue (`REFUSED_WHEN_ABSENT`). `check_config` applies the same rules to a
composed config and logs each change. The checkpoint side (reading one needs torch) is
`finetune.resume`; this module imports no torch, so a refused resume ends in well under a
second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import typing
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from hydra._internal.utils import get_args_parser  # the parser @hydra.main itself uses
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.config import ConfigError, check_overrides
from finetune.config.schema import RESUMABLE_ENTRIES, SCHEMAS, Config
from finetune.errors import FinetuneError
from finetune.rundir import CONFIG_FILE, flatten

log = logging.getLogger(__name__)

SAVED_OVERRIDES = Path(".hydra") / "overrides.yaml"
# Not part of the experiment: where it runs and what it resumes from.
_NOT_COMPARED = ("run_dir", "ckpt_path")
# The saved value of a key the run's config does not have: the key was added to the project
# after the run was made.
ABSENT = "<not in the run's config>"


class ResumeRefused(FinetuneError):
    """A resume that stopped before training; the run dir is as it was."""


# --- which run and which checkpoint -------------------------------------------------------------


def source_run_dir(ckpt_path: Any, run_dir: Path) -> Path | None:
    """The run dir whose checkpoint `ckpt_path` names (`last`: `run_dir`; a run dir; a file in
    a run's checkpoints/), when it holds a saved config.yaml; None otherwise."""
    if ckpt_path in (None, "", "null"):
        return None
    path = run_dir if ckpt_path == "last" else Path(str(ckpt_path)).expanduser()
    if path.is_file() and path.parent.name == "checkpoints":
        path = path.parent.parent
    return path if (path / CONFIG_FILE).is_file() else None


def is_in_place(ckpt_path: Any, run_dir: Path) -> bool:
    """Whether `ckpt_path` continues the run of `run_dir` itself (whose files stay as they are)."""
    source = source_run_dir(ckpt_path, run_dir)
    return source is not None and source.resolve() == run_dir.resolve()


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last` (this run dir's last checkpoint), a run dir (its last checkpoint) or a file; None
    for no `ckpt_path`. `FinetuneError` naming where it looked when there is no such file."""
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


# --- what the schema says of a key --------------------------------------------------------------


@functools.cache
def _schema_fields(key: str) -> tuple[dataclasses.Field, ...]:
    """The schema fields the dotted `key` may name: a group's key in each of its options'
    schemas, with the fields a subclass redeclares (to change a default) in each base too."""
    schemas: list[type] = [Config]
    *parents, name = key.split(".")
    for part in parents:
        nested: list[type] = []
        for schema in schemas:
            if schema is Config and part in SCHEMAS:
                nested += SCHEMAS[part].values()
                continue
            hint = typing.get_type_hints(schema).get(part)
            if dataclasses.is_dataclass(hint):
                nested.append(hint)
        schemas = nested
    return tuple(
        spec
        for schema in schemas
        for cls in schema.__mro__
        if dataclasses.is_dataclass(cls)
        for spec in dataclasses.fields(cls)
        if spec.name == name
    )


def resumable(key: str) -> bool:
    """Whether a resume may change the dotted `key`: its schema field is `RESUMABLE`, or it is
    (an entry of) a free-form group in `RESUMABLE_ENTRIES`."""
    if any(key == group or key.startswith(f"{group}.") for group in RESUMABLE_ENTRIES):
        return True
    return any(spec.metadata.get("resumable") for spec in _schema_fields(key))


def refused_when_absent(key: str) -> bool:
    """Whether a run whose saved config lacks `key` cannot resume (`REFUSED_WHEN_ABSENT`)."""
    return any(spec.metadata.get("refused_when_absent") for spec in _schema_fields(key))


# --- comparing with the run's saved config ------------------------------------------------------


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
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.run_dir = run_dir
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def check_changes(
    changes: dict[str, tuple[Any, Any]],
    source: Path,
    typed: Sequence[str] = (),
    typed_changes: Collection[str] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """The `changes` (`config_changes`) a resume of `source` applies; `ResumeRefused` naming
    every one its checkpoint cannot follow, those of the keys in the `typed` overrides (or in
    `typed_changes`, the keys they change, through interpolations too: paths.data_root changes
    data.root) first, and the overrides that caused them. A key the run's saved config lacks
    takes its default (it stays among the changes returned, saved value ABSENT) unless the
    overrides change it (`typed_changes`; when None, the keys `typed` names) or its field is
    `REFUSED_WHEN_ABSENT`."""
    typed_keys = [_key(line) for line in typed]

    def under(key: str, keys: Collection[str]) -> bool:
        return any(key == t or key.startswith(f"{t}.") for t in keys)

    def was_typed(key: str) -> bool:
        return under(key, [*typed_keys, *(typed_changes or ())])

    def defaulted(key: str) -> bool:
        changed = under(key, typed_keys if typed_changes is None else typed_changes)
        return changes[key][0] == ABSENT and not changed and not refused_when_absent(key)

    refused = {k: v for k, v in changes.items() if not resumable(k) and not defaulted(k)}
    if not refused:
        return changes
    # A key the run lacks that another group option brings (strategy=lp_ft: strategy.bn, ...)
    # is no news beside the option's own change (strategy.name): counted, not listed.
    typed_values = [t for t in typed_keys if t not in SCHEMAS]  # not a group choice
    brought = [
        k for k, (old, _) in refused.items() if old == ABSENT and was_typed(k)
        and not under(k, typed_values)
    ]  # fmt: skip
    shown = {k: v for k, v in refused.items() if k not in brought} or refused
    listed = "; ".join(
        f"{k}: {old!r} in the run, {new!r} now"
        for k, (old, new) in sorted(shown.items(), key=lambda item: not was_typed(item[0]))
    )
    if len(shown) < len(refused):
        keys = "key" if len(brought) == 1 else "keys"
        listed += f" (and {len(brought)} {keys} of the new option that the run's config lacks)"
    # the typed overrides a resume could not follow (print_config=false it can)
    guilty = [line for line in typed if not resumable(_key(line))] or list(typed)
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
    cannot follow (`ResumeRefused`), log each one that is applied, one line each."""
    source = source_run_dir(cfg.get("ckpt_path"), run_dir)
    if source is None:
        return
    changes = config_changes(OmegaConf.load(source / CONFIG_FILE), cfg)
    for key, (old, new) in check_changes(changes, source).items():
        if old == ABSENT:
            log.info(
                "Resume of %s: key %s was not in the run's saved config; it takes its default %r",
                source,
                key,
                new,
            )
        else:
            log.info("Resume of %s: %s changed from %r to %r", source, key, old, new)


# --- the command line ---------------------------------------------------------------------------


class ResumeCommand(NamedTuple):
    """A command line of train.py as a resume runs it."""

    argv: list[str]  # the run's saved overrides first, the new ones on top
    # for a resume of a run with saved overrides: the config `argv` composes to, the run dir
    # resumed and its checkpoint file; None otherwise
    cfg: DictConfig | None = None
    source: Path | None = None
    checkpoint: str | None = None


def with_saved_overrides(argv: Sequence[str]) -> ResumeCommand:
    """`argv` of `python train.py` with the resumed run's saved overrides put first, so that
    `hydra.run.dir=D ckpt_path=last` alone continues D with D's config; the new overrides win.
    A resume in place adds `hydra.output_subdir=null` (Hydra then leaves D/.hydra/ as it is).
    Other command lines come back unchanged. Raises, before Hydra starts (so nothing is
    written): `ResumeRefused` for a new override the checkpoint cannot follow, `FinetuneError`
    for a `ckpt_path` that names no checkpoint, `ConfigError` for a wrong new value."""
    unchanged = ResumeCommand(list(argv))
    args = get_args_parser().parse_args(list(argv))
    if args.multirun or args.overrides != list(argv):  # flags: Hydra's business, as typed
        return unchanged
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # Hydra's own message explains a malformed override
        return unchanged
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
        return unchanged
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
        return unchanged
    # a saved override typed again as it was changes nothing: it is not blamed for a refusal
    typed = [
        line
        for line in argv
        if _key(line) not in ("hydra.run.dir", "ckpt_path") and line not in saved
    ]
    changes = config_changes(OmegaConf.load(source / CONFIG_FILE), cfg)
    check_changes(changes, source, typed, _changed_by(typed, kept + tail, cfg, check_overrides))
    return ResumeCommand(kept + tail, cfg, source, checkpoint)


def _changed_by(
    typed: list[str],
    overrides: list[str],
    cfg: DictConfig,
    compose: Callable[[list[str]], DictConfig],
) -> set[str] | None:
    """The keys of `cfg` (composed from `overrides`) that the `typed` ones change, through
    interpolations too; None when the config does not compose without them."""
    if not typed:
        return set()
    try:
        without = compose([line for line in overrides if line not in typed])
    except (ConfigError, HydraException):
        return None
    before, now = _flat(without, ""), _flat(cfg, "")
    return {key for key in {*before, *now} if before.get(key, ABSENT) != now.get(key, ABSENT)}


def _fitting(
    saved: list[str], new: list[str], compose: Callable[[list[str]], DictConfig]
) -> list[str]:
    """The saved overrides, in order, that still compose with the `new` ones: a change the new
    ones cause is then theirs alone, not the defaults of a dropped saved override."""
    fitting: list[str] = []
    for line in saved:
        with contextlib.suppress(ConfigError, HydraException):
            compose([*fitting, line, *new])
            fitting.append(line)
    return fitting


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")
