"""Reading a weights file: the tensors inside the usual checkpoint containers, safely.

A weights file is rarely a bare state dict. Training scripts save `{"model": sd, "epoch": 300}`,
`{"state_dict": sd, "state_dict_ema": ema}` (timm), `{"model_state_dict": sd, ...}`, Lightning
checkpoints (`state_dict` with the LightningModule's attribute as a prefix), and wrap the keys in
`module.` (DataParallel/DDP) or `_orig_mod.` (torch.compile), sometimes both. `read_weights` finds
the state dict inside and says where it found it; `strip_to_target` removes a prefix (such as a
LightningModule's `model.`) that stands between the file's names and the network's. Nothing is
ever unpickled as code: files go through `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import argparse
import pickle
import pickletools
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError

# Entries that hold a state dict, in the order they are preferred. EMA copies come first, as in
# timm's own loader (`load_state_dict(use_ema=True)`): they are the weights a run evaluated.
EMA_ENTRIES = (
    "state_dict_ema",
    "model_ema",
    "model_ema_state_dict",
    "ema_state_dict",
    "ema_model",
    "ema",
)
PLAIN_ENTRIES = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
MAX_DEPTH = 4  # {"checkpoint": {"model": {"state_dict": sd}}} is as deep as files go
SAFE_GLOBALS = [argparse.Namespace]  # timm's training checkpoints store their `args`


@dataclass
class WeightsFile:
    """The tensors of a weights file and how they were found.

    `state_dict` maps names (wrapper prefixes removed) to tensors; `entry` is the path of the
    entry that held them (`"model_ema"`, `"checkpoint/state_dict"`), None when the file is the
    state dict itself; `notes` say it in words for the load report."""

    state_dict: dict[str, torch.Tensor]
    entry: str | None = None
    notes: list[str] = field(default_factory=list)


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a `.safetensors` or torch file (see `read_weights`)."""
    return read_weights(path).state_dict


def read_weights(path: str | Path) -> WeightsFile:
    """Read `path` (`.safetensors` or a torch file) without executing pickled code and find its
    state dict: the file itself, or the single state dict nested under a usual entry name
    (EMA copies preferred), with `module.`/`_orig_mod.` prefixes removed however nested.

    Raises `FinetuneError` for a missing file, a file that needs pickled code (a whole pickled
    `nn.Module` is named as such), and a file that holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FinetuneError(f"Weights file {path} does not exist; check the path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        content: Any = load_safetensors(str(path), device="cpu")
    else:
        content = _torch_load(path)
    state, entry = _find_state_dict(content, path)
    state, removed = strip_wrappers(state)
    notes = []
    if entry is not None:
        known = (*EMA_ENTRIES, *PLAIN_ENTRIES)
        held = _entries_holding_tensors(content)
        others = [k for k in held if k in known and k != entry.split("/")[0]]
        kind = " (EMA weights)" if entry.split("/")[-1] in EMA_ENTRIES else ""
        also = f"; the file also holds {', '.join(repr(k) for k in others)}" if others else ""
        notes.append(f"tensors from the file's entry '{entry}'{kind}{also}")
    if removed:
        notes.append(f"removed the wrapper prefix(es) {', '.join(repr(p) for p in removed)}")
    return WeightsFile(state, entry, notes)


def _torch_load(path: Path) -> Any:
    if not _is_torch_file(path):  # torch's reader would misread any other bytes as opcodes
        raise FinetuneError(
            _not_weights(path, "neither a torch checkpoint (torch.save) nor safetensors")
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise FinetuneError(_refusal(path)) from error
    except (EOFError, OSError, RuntimeError) as error:  # empty, or a damaged zip archive
        unreadable = (FileNotFoundError, PermissionError, IsADirectoryError)
        if isinstance(error, unreadable) or (
            isinstance(error, RuntimeError) and "PytorchStreamReader" not in str(error)
        ):
            raise
        raise FinetuneError(_not_weights(path, "it ends before its data")) from error


def _is_torch_file(path: Path) -> bool:
    """torch.save's zip archive, or its legacy format: a pickle (PROTO opcode first)."""
    with path.open("rb") as handle:
        pickled = handle.read(1) == b"\x80"
    return pickled or zipfile.is_zipfile(path)


def _not_weights(path: Path, why: str) -> str:
    return (
        f"{path} is not a weights file: {why}; it may be damaged or another kind of file. "
        "Fix: model.weights=... a .pth, .pt, .ckpt or .safetensors file."
    )


def _refusal(path: Path) -> str:
    """Why a file that needs pickled code is refused, and how to re-save it."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # an unreadable archive: name nothing
        names = []
    shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    if any(name.startswith("torch.nn.modules.") for name in names):
        model = _pickled_class(path) or next(
            (n for n in names if not n.startswith("torch.")), names[0]
        )
        return (
            f"Refused to load {path}: it holds a whole pickled model ({model}), not a state "
            "dict, and unpickling it would run Python code from the file. Fix: where you trust "
            f"the file, re-save its weights: torch.save(torch.load('{path}', "
            "weights_only=False).state_dict(), 'weights.pth'), and pass model.weights=weights.pth."
        )
    return (
        f"Refused to load {path}: it needs pickled Python objects ({shown or 'unknown'}), which "
        "could run arbitrary code. Fix: re-save it as a plain state dict "
        "(torch.save(model.state_dict(), ...)) or as .safetensors."
    )


def _pickled_class(path: Path) -> str | None:
    """The class of the object a torch file pickles (its first global), read without unpickling.
    `get_unsafe_globals_in_checkpoint` lists the classes in no fixed order (a set)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            for opcode, argument, _ in pickletools.genops(archive.read(data)):
                if opcode.name == "GLOBAL":
                    return str(argument).replace(" ", ".")
    except (OSError, StopIteration, ValueError, zipfile.BadZipFile):
        pass
    return None


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())
    )


def _holds_tensors(value: Any, depth: int = MAX_DEPTH) -> bool:
    if torch.is_tensor(value):
        return True
    if depth == 0 or not isinstance(value, Mapping):
        return False
    return any(_holds_tensors(v, depth - 1) for v in value.values())


def _entries_holding_tensors(content: Any) -> list[str]:
    if not isinstance(content, Mapping) or _is_state_dict(content):
        return []
    return [k for k, v in content.items() if isinstance(v, Mapping) and _holds_tensors(v)]


def _find_state_dict(content: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in `content` and the entry path that led to it (None: `content` itself)."""
    trail: list[str] = []
    node = content
    for _ in range(MAX_DEPTH + 1):
        if _is_state_dict(node):
            return dict(node), "/".join(trail) or None
        if not isinstance(node, Mapping):
            break
        nested = [k for k, v in node.items() if isinstance(v, Mapping) and _holds_tensors(v)]
        known = [k for k in (*EMA_ENTRIES, *PLAIN_ENTRIES) if k in nested]
        if known or len(nested) == 1:
            key = (known or nested)[0]
            trail.append(str(key))
            node = node[key]
            continue
        tensors = {k: v for k, v in node.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors and not nested:  # a state dict with a few plain values beside the tensors
            return tensors, "/".join(trail) or None
        break
    where = f" under '{'/'.join(trail)}'" if trail else ""
    if isinstance(node, Mapping):
        keys = ", ".join(map(str, list(node)[:12]))
        found = f"a dict{where} with the keys {keys}"
    else:
        found = f"{type(node).__name__}{where}"
    raise FinetuneError(
        f"{path} holds no state dict that could be found: it holds {found}. Fix: save the "
        "network's weights alone (torch.save(model.state_dict(), ...)), or under one of the "
        f"entries {', '.join(PLAIN_ENTRIES[:4])}."
    )


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` with the DataParallel/DDP and torch.compile prefixes removed from every key,
    however nested (`module._orig_mod.module.x` -> `x`), and the prefixes that were removed."""
    cleaned: dict[str, torch.Tensor] = {}
    removed: set[str] = set()
    for key, tensor in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            prefix = next(p for p in WRAPPER_PREFIXES if key.startswith(p))
            removed.add(prefix)
            key = key[len(prefix) :]
        cleaned[key] = tensor
    return cleaned, sorted(removed)


def strip_to_target(
    state: Mapping[str, torch.Tensor], target_keys: Iterable[str]
) -> tuple[dict[str, torch.Tensor], str | None]:
    """`state` with the key prefix removed that makes the most of its names the network's
    (`model.` of a LightningModule holding the network as `self.model`), and that prefix; the
    keys unchanged (and None) unless a prefix matches more names than none and at least half of
    the network's (a block's inner names, `layer1.0.bn1.weight` -> `bn1.weight`, are no match
    of the whole). Keys outside the prefix stay as they are. On a tie an EMA copy (a prefix
    naming `ema`) wins."""
    target = {k for k in target_keys if not k.endswith("num_batches_tracked")}
    direct = len(target & set(state))
    counts: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for cut in range(1, len(parts)):
            if ".".join(parts[cut:]) in target:
                counts[".".join(parts[:cut]) + "."] += 1
    if not counts:
        return dict(state), None
    prefix = max(counts, key=lambda p: (counts[p], "ema" in p, -len(p)))
    if counts[prefix] <= direct or counts[prefix] < len(target) / 2:
        return dict(state), None
    stripped = {k: v for k, v in state.items() if not k.startswith(prefix)}
    stripped |= {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return stripped, prefix
