"""Matching a state dict's tensors to a network, bottom-up (reading files: `weight_files`)."""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from finetune.weight_files import load_file, read_weights, strip_to_target

__all__ = [
    "NAMINGS",
    "RENAMES",
    "LoadReport",
    "adopt_naming",
    "guess_rename",
    "load_bottom_up",
    "load_file",
    "lukemelas_efficientnet_lite_renames",
    "read_weights",
    "rename_keys",
    "strip_to_target",
    "tensor_key",
    "trace_layers",
]

# Where this project's checkpoints keep the network's tensors (ClassifierModule.network -> .net;
# earlier versions: `backbone`). The one place these prefixes are written down.
CHECKPOINT_PREFIX = "network.net."
LEGACY_CHECKPOINT_PREFIX = "backbone.net."
# How reports name the root module's own tensors (a ViT's cls_token, pos_embed, dist_token).
ROOT_LAYER = "(root)"

# Ready-made key rewrites (regex, replacement), applied in order to every source key.
RENAMES: dict[str, list[tuple[str, str]]] = {
    # nn.DataParallel / DistributedDataParallel wrap the model as `module`.
    "dataparallel": [(r"^module\.", "")],
    # A Lightning checkpoint's `state_dict` of this project, old or new: onto the network's names.
    "lightning": [(r"^(?:model\.|module\.)?(?:network|backbone)\.net\.", "")],
    # A checkpoint written before the rename, onto today's ClassifierModule names.
    "lightning_legacy": [(rf"^{re.escape(LEGACY_CHECKPOINT_PREFIX)}", CHECKPOINT_PREFIX)],
    # torchvision DenseNet checkpoints from before 0.3 name `norm.1` what is now `norm1`.
    "densenet_legacy": [
        (
            r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
            r"\1\2",
        )
    ],
}


def lukemelas_efficientnet_lite_renames(stage_depths: list[int]) -> list[tuple[str, str]]:
    """Rename table from the lukemelas EfficientNet(-Lite) names onto timm's.

    lukemelas numbers blocks flatly (`_blocks.7.`) where timm nests them by stage
    (`blocks.3.1.`), so the table depends on the stage depths (`[len(s) for s in net.blocks]`).
    The first stage's blocks have no expansion conv, which shifts their norm names.
    """
    table: list[tuple[str, str]] = [
        (r"^_conv_stem\.", "conv_stem."),
        (r"^_bn0\.", "bn1."),
        (r"^_conv_head\.", "conv_head."),
        (r"^_bn1\.", "bn2."),
        (r"^_fc\.", "classifier."),
    ]
    flat_index = 0
    for stage, depth in enumerate(stage_depths):
        for block in range(depth):
            if stage == 0:  # depthwise-separable block: dw conv, bn1, pw conv, bn2
                inner = {
                    "_depthwise_conv": "conv_dw",
                    "_bn1": "bn1",
                    "_project_conv": "conv_pw",
                    "_bn2": "bn2",
                }
            else:  # inverted residual: expand, bn1, dw, bn2, project, bn3
                inner = {
                    "_expand_conv": "conv_pw",
                    "_bn0": "bn1",
                    "_depthwise_conv": "conv_dw",
                    "_bn1": "bn2",
                    "_project_conv": "conv_pwl",
                    "_bn2": "bn3",
                }
            for old, new in inner.items():
                table.append(
                    (rf"^_blocks\.{flat_index}\.{old}\.", f"blocks.{stage}.{block}.{new}.")
                )
            flat_index += 1
    return table


def _lukemelas_table(net: torch.nn.Module) -> list[tuple[str, str]] | None:
    blocks = getattr(net, "blocks", None)
    if blocks is None or not hasattr(net, "conv_stem"):  # not a timm EfficientNet
        return None
    return lukemelas_efficientnet_lite_renames([len(stage) for stage in blocks])


# Foreign namings of the same tensors that the built-in sources rename, found again in a file:
# name -> (words for the load report, a regex some key matches, the table for a network or None
# where the network is no target of it). `adopt_naming` applies the one that fits.
NAMINGS: dict[str, tuple[str, str, Callable[[torch.nn.Module], list[tuple[str, str]] | None]]] = {
    "lukemelas_efficientnet": (
        "the lukemelas EfficientNet(-Lite) naming (_conv_stem, _blocks.N) onto timm's",
        r"^_(?:conv_stem|blocks\.\d+)\.",
        _lukemelas_table,
    ),
    "densenet_legacy": (
        "torchvision's legacy DenseNet naming (norm.1) onto today's (norm1)",
        RENAMES["densenet_legacy"][0][0],
        lambda net: RENAMES["densenet_legacy"],
    ),
}


def _matches(keys: Iterable[str], target: set[str]) -> int:
    return len(target.intersection(keys))


def _naming_prefix(pattern: str, keys: Iterable[str]) -> str | None:
    """The prefix before the keys that have a naming's form (`model.` of a LightningModule;
    "" for none), the commonest where several; None when no key has the form."""
    body = pattern.removeprefix("^")
    prefixes: Counter[str] = Counter()
    for key in keys:
        found = re.search(rf"(?:^|(?<=\.)){body}", key)
        if found:
            prefixes[key[: found.start()]] += 1
    return max(prefixes, key=prefixes.__getitem__) if prefixes else None


def adopt_naming(
    state_dict: Mapping[str, torch.Tensor], net: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], str | None]:
    """`state_dict` renamed from a known foreign naming (`NAMINGS`) onto `net`'s names, and
    the words for the naming applied (None: the keys are returned unchanged). A naming applies
    when some key has its form (after a prefix such as `model.`, which is then removed) and
    renaming makes more of the keys `net`'s own."""
    target = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    best, best_count, applied = dict(state_dict), _matches(state_dict, target), None
    for words, pattern, table_for in NAMINGS.values():
        prefix = _naming_prefix(pattern, state_dict)
        table = None if prefix is None else table_for(net)
        if table is None:
            continue
        unprefixed = {k.removeprefix(prefix): v for k, v in state_dict.items()}
        renamed = rename_keys(unprefixed, table)
        if _matches(renamed, target) > best_count:
            best, best_count = renamed, _matches(renamed, target)
            applied = words + (f" (after removing the prefix '{prefix}')" if prefix else "")
    return best, applied


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], rename: str | list[tuple[str, str]] | None
) -> dict[str, torch.Tensor]:
    """Apply a rename table (a name from RENAMES or a list of (regex, replacement)), keeping
    `_metadata` (module versions: torchvision's MNASNet refuses a state dict without it)."""
    table = [] if rename is None else RENAMES[rename] if isinstance(rename, str) else rename

    def renamed(key: str) -> str:
        for pattern, replacement in table:
            key = re.sub(pattern, replacement, key)
        return key

    result = OrderedDict((renamed(key), tensor) for key, tensor in state_dict.items())
    if (metadata := getattr(state_dict, "_metadata", None)) is not None:  # "" is the root
        pairs = ((renamed(f"{p}.")[:-1] if p else p, v) for p, v in metadata.items())
        result._metadata = OrderedDict(pairs)  # type: ignore[attr-defined]
    return result


def guess_rename(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The rename table a state dict evidently needs (our Lightning checkpoints, DataParallel)."""
    keys = list(state_dict)
    prefixes = (CHECKPOINT_PREFIX, LEGACY_CHECKPOINT_PREFIX)
    if any(key.removeprefix("model.").startswith(prefixes) for key in keys):
        return "lightning"
    if keys and all(key.startswith("module.") for key in keys):
        return "dataparallel"
    return None


def _own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A layer's own parameters and persistent buffers (not its children's)."""
    tensors = {name: p for name, p in module._parameters.items() if p is not None}
    tensors |= {
        name: b
        for name, b in module._buffers.items()
        if b is not None and name not in module._non_persistent_buffers_set
    }
    return tensors


def _upstream_layers(tensors: list[torch.Tensor], owner: dict[int, str]) -> set[str]:
    """Layers whose parameters the given tensors were computed from (via the autograd graph)."""
    found: set[str] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf parameter
        if variable is not None and id(variable) in owner:
            found.add(owner[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def tensor_key(layer: str, tensor_name: str) -> str:
    """The state-dict name of a layer's own tensor; the root module (`layer == ""`) holds
    tensors such as a ViT's `cls_token` under their bare names."""
    return f"{layer}.{tensor_name}" if layer else tensor_name


def _place_containers(
    order: list[str], ancestors: dict[str, set[str]], layers: Mapping[str, torch.nn.Module]
) -> list[str]:
    """`order` with each container (a layer holding tensors and layers: the root's
    `cls_token`/`pos_embed`, torchvision's `encoder.pos_embedding`) moved right before the
    first inner-most layer computed from its tensors (its pre-hook fires before its children
    run): a ViT's tokens load with the patch embedding. Unused ones keep their place."""

    def holds_layers(name: str) -> bool:
        inside = f"{name}." if name else ""
        return any(other != name and other.startswith(inside) for other in layers)

    containers = {name for name in layers if holds_layers(name)}
    leaves = [name for name in order if name not in containers]
    consumer_of = {
        container: next((leaf for leaf in leaves if container in ancestors[leaf]), None)
        for container in containers
    }
    placed: list[str] = []
    for name in order:
        if name in containers and consumer_of[name] is not None:
            continue
        placed += [c for c in order if c in containers and consumer_of[c] == name]
        placed.append(name)
    return placed


def trace_layers(
    model: torch.nn.Module, example_inputs: tuple[Any, ...]
) -> tuple[list[str], dict[str, set[str]]]:
    """Parameterised layers (module names; "" is the root module when it holds tensors of its
    own) in the order the forward pass runs them, and for each layer the layers its input was
    computed from. A container's own tensors are placed where they are first used
    (`_place_containers`). Layers the forward pass never runs come last."""
    layers = {name: m for name, m in model.named_modules() if _own_tensors(m)}
    owner = {
        id(p): name for name, m in layers.items() for p in m._parameters.values() if p is not None
    }
    order: list[str] = []
    ancestors: dict[str, set[str]] = {}

    def make_hook(name: str):
        def hook(_module, args, kwargs):
            if name not in ancestors:  # a layer used twice keeps its first position
                inputs = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
                ancestors[name] = _upstream_layers(inputs, owner)
                order.append(name)

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in layers.items()
    ]
    was_training = model.training
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        with torch.enable_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for parameter in model.parameters():
            parameter.requires_grad_(requires_grad[id(parameter)])
    order = _place_containers(order, ancestors, layers)
    never_run = []
    for name in (name for name in layers if name not in ancestors):
        # A layer whose tensors another module uses directly (nn.MultiheadAttention's
        # out_proj, timm's relative position tables read through `get_bias()`) loads right
        # before the first layer computed from them, else with its container; any other is
        # treated as above everything that ran.
        consumer = next((layer for layer in order if name in ancestors[layer]), None)
        if consumer is not None:
            ancestors[name] = ancestors[consumer] - {name}
            order.insert(order.index(consumer), name)
            continue
        container = _running_container(name, ancestors)
        if container is None:
            never_run.append(name)
            continue
        ancestors[name] = ancestors[container] | {container}
        position = order.index(container) + 1
        while position < len(order) and order[position].startswith(f"{container}."):
            position += 1
        order.insert(position, name)
    for name in never_run:
        ancestors[name] = set(order)
    return order + never_run, ancestors


def _running_container(name: str, ancestors: Mapping[str, set[str]]) -> str | None:
    """The innermost module above `name` (not the root) that the forward pass ran, if any."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in ancestors:
            return candidate
    return None


@dataclass
class LoadReport:
    """What `load_bottom_up` loaded, where it stopped and why."""

    loaded: list[str] = field(default_factory=list)
    blockers: list[dict[str, str]] = field(default_factory=list)  # one per blocked input path
    not_loaded: list[str] = field(default_factory=list)  # layers above a blocker
    unused_source_keys: list[str] = field(default_factory=list)
    total_layers: int = 0
    notes: list[str] = field(default_factory=list)  # where the tensors came from (entry, prefix)

    @property
    def blocker(self) -> dict[str, str] | None:
        return self.blockers[0] if self.blockers else None

    @property
    def loaded_fraction(self) -> float:
        return len(self.loaded) / self.total_layers if self.total_layers else 0.0

    def counts(self) -> dict[str, Any]:
        return {
            "weights_loaded_layers": len(self.loaded),
            "weights_total_layers": self.total_layers,
            "weights_loaded_fraction": round(self.loaded_fraction, 4),
            "weights_blocker": self.blocker["layer"] if self.blocker else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "blocker": self.blocker, "loaded_fraction": self.loaded_fraction}

    def __str__(self) -> str:
        lines = [f"Loaded {len(self.loaded)} of {self.total_layers} layers bottom-up."]
        lines += [f"  source:      {note}" for note in self.notes]
        if self.loaded:
            lines.append(f"  loaded:      {self.loaded[0]} .. {self.loaded[-1]}")
        for blocker in self.blockers:
            lines.append(
                f"  blocker:     {blocker['layer']} ({blocker['type']}): {blocker['reason']}"
            )
        if self.not_loaded:
            shown = ", ".join(self.not_loaded[:6]) + (" ..." if len(self.not_loaded) > 6 else "")
            lines.append(f"  not loaded:  {len(self.not_loaded)} layers above a blocker: {shown}")
        if self.unused_source_keys:
            shown = ", ".join(self.unused_source_keys[:6])
            more = " ..." if len(self.unused_source_keys) > 6 else ""
            lines.append(
                f"  unused keys: {len(self.unused_source_keys)} in the source: {shown}{more}"
            )
        return "\n".join(lines)


def _mismatch(name: str, layer: torch.nn.Module, source: Mapping[str, torch.Tensor]) -> str | None:
    """Why `layer` cannot take the source's tensors, or None when it can."""
    own = _own_tensors(layer)
    required = [t for t in own if t != "num_batches_tracked"]
    missing = [t for t in required if tensor_key(name, t) not in source]
    if len(missing) == len(required):
        return "missing: no tensors for this layer in the source"
    if missing:
        return f"type: the source lacks {', '.join(missing)} (a different layer type)"
    if name:  # the root's bare names: other roots' tensors are no sign of another layer type
        prefix = f"{name}."
        extra = [
            k[len(prefix) :]
            for k in source
            if k.startswith(prefix) and "." not in k[len(prefix) :] and k[len(prefix) :] not in own
        ]
        if extra:
            return f"type: the source has {', '.join(sorted(extra))}, which this layer lacks (a different layer type)"
    for tensor_name in required:
        theirs, mine = source[tensor_key(name, tensor_name)], own[tensor_name]
        if theirs.shape != mine.shape:
            return f"shape: {tensor_name} {tuple(theirs.shape)} in the source vs {tuple(mine.shape)} here"
    return None


def load_bottom_up(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    rename: str | list[tuple[str, str]] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
) -> LoadReport:
    """Initialise `model` from `state_dict` from the input upwards, up to the first layer that
    cannot be loaded (the blocker), and nothing above it.

    Layers are visited in the order the forward pass runs them (traced on `example_inputs`,
    default one 224x224 RGB image). A layer loads when the source has a tensor of the same name
    (after `rename`) and shape for each of its parameters and buffers; the first layer that
    fails is the blocker and no later layer loads, even where names and shapes match. With
    several input paths (an image and a text branch), each path loads up to its own blocker,
    and a layer that combines paths loads only if none of them is blocked."""
    source = rename_keys(state_dict, rename)
    if example_inputs is None:
        example_inputs = (torch.zeros(1, 3, 224, 224),)
    layers, ancestors = trace_layers(model, example_inputs)
    # A path is named by its first layers: those computed from the inputs alone.
    roots = {name: {a for a in ancestors[name] | {name} if not ancestors[a]} for name in layers}
    report = LoadReport(total_layers=len(layers))
    blocked_paths: set[str] = set()
    used: set[str] = set()
    with torch.no_grad():
        for name in layers:
            layer = model.get_submodule(name)
            if roots[name] & blocked_paths:
                report.not_loaded.append(name or ROOT_LAYER)
                continue
            reason = _mismatch(name, layer, source)
            if reason:
                blocked_paths |= roots[name]
                report.blockers.append(
                    {"layer": name or ROOT_LAYER, "type": type(layer).__name__, "reason": reason}
                )
                continue
            for tensor_name, tensor in _own_tensors(layer).items():
                key = tensor_key(name, tensor_name)
                if key in source:
                    tensor.copy_(source[key])
                    used.add(key)
            report.loaded.append(name or ROOT_LAYER)
    # A module under two names (CoaT's shared convolutions) loads once: its alias keys are used.
    own = model.state_dict(keep_vars=True)
    loaded = {id(own[key]) for key in used if key in own}
    unused = set(source) - used
    report.unused_source_keys = sorted(k for k in unused if id(own.get(k)) not in loaded)
    return report
