"""Optimisation: parameter groups, layer-wise learning rates, warmup schedules.

Plain functions over named parameters, used by `ClassifierModule.configure_optimizers` and by the
gradual strategy (which adds groups to the running optimizer and schedule as blocks unfreeze).

Every param group carries its real `lr` (base rate x the parameter's scale), and the schedule is
one per-step multiplier applied to all groups alike, so the ratios between groups hold at every
step. The schedule is a `LambdaLR` over a callable object rather than torch's stock warmup and
cosine schedulers: `CosineAnnealingLR`'s floor (`eta_min`) is one absolute rate for every group,
which would break the ratios, `SequentialLR` restarts the step count of the scheduler after the
warmup (the step schedule counts from the first step), and neither accepts groups added while
it runs.

On resume the schedule is the one the config asks for, never the checkpoint's: torch's `LambdaLR`
would restore the callable's attributes (`total_steps`, `warmup_steps`, `steps_per_epoch`) and so
keep the interrupted run's horizon after `trainer.max_epochs` grew. `ConfiguredLambdaLR` restores
only the step count, and maps it onto the new steps per epoch when that changed (other devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from finetune.config.schema import (
    SCHEDULERS,
    CosineSchedulerConfig,
    SchedulerConfig,
    StepSchedulerConfig,
)
from finetune.errors import unknown_name

LrScale = Callable[[str], float]


def uniform(_name: str) -> float:
    """Every parameter at the base rate."""
    return 1.0


class WarmupSchedule:
    """Learning-rate multiplier per optimizer step: linear warmup, then cosine, step or constant.

    `warmup_epochs`, `step_epochs` are in epochs (of `steps_per_epoch` steps); `min_lr_ratio` is
    the cosine's floor as a fraction of each group's rate. Raises `UnknownNameError` for another
    `kind`. A callable object (not a lambda) so that LambdaLR can save and restore it.
    """

    KINDS = SCHEDULERS

    def __init__(
        self,
        kind: str,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = SchedulerConfig.warmup_epochs,
        min_lr_ratio: float = CosineSchedulerConfig.min_lr_ratio,
        step_epochs: int = StepSchedulerConfig.step_epochs,
        gamma: float = StepSchedulerConfig.gamma,
    ) -> None:
        if kind not in self.KINDS:
            raise unknown_name("scheduler", kind, self.KINDS)
        self.kind = kind
        self.total_steps = max(int(total_steps), 1)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.warmup_steps = round(warmup_epochs * self.steps_per_epoch)
        self.min_lr_ratio = min_lr_ratio
        self.step_epochs = step_epochs
        self.gamma = gamma
        # Added to the step count: nonzero only after a resume with other steps per epoch, so
        # that the schedule continues at the same epoch position.
        self.step_shift = 0.0

    def continue_from(self, step: int, saved: Mapping[str, Any]) -> None:
        """Continue at optimizer step `step` of a run whose schedule had the attributes `saved`
        (the checkpoint's): this schedule keeps its own horizon; only the position in epochs is
        carried over when the steps per epoch differ."""
        saved_per_epoch = int(saved.get("steps_per_epoch", self.steps_per_epoch))
        saved_shift = float(saved.get("step_shift", 0.0))
        if saved_per_epoch == self.steps_per_epoch:
            self.step_shift = saved_shift  # exact: no float round trip on an unchanged run
            return
        epochs_done = (step + saved_shift) / max(saved_per_epoch, 1)
        self.step_shift = epochs_done * self.steps_per_epoch - step

    def __call__(self, step: int) -> float:
        step = step + self.step_shift if self.step_shift else step
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** (step // (self.step_epochs * self.steps_per_epoch))
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


class LayerwiseRates:
    """Learning rate of a parameter as a multiple of the base rate, by its depth below the head.

    The new head (in no block) learns at the base rate. Pretrained layers learn at
    `backbone_lr_scale` of it, times `layer_decay ** depth` when layer decay is set, where depth
    counts `blocks` (input to output, as `Network.blocks()` gives them) from the top: the top
    block is 1. Names are those of `blocks`.
    """

    def __init__(
        self, blocks: list[list[str]], backbone_lr_scale: float, layer_decay: float | None = None
    ) -> None:
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.layer_decay = float(layer_decay) if layer_decay else None
        self.depths = {
            name: len(blocks) - index for index, block in enumerate(blocks) for name in block
        }

    def __call__(self, name: str) -> float:
        depth = self.depths.get(name, 0)
        if depth == 0:
            return 1.0
        decay = self.layer_decay**depth if self.layer_decay else 1.0
        return self.backbone_lr_scale * decay


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    base_lr: float,
    weight_decay: float,
    lr_scale: LrScale = uniform,
) -> list[dict[str, Any]]:
    """Trainable parameters only, grouped by learning rate and weight decay.

    `lr_scale(name)` gives each parameter's learning rate as a multiple of `base_lr`; biases and
    norm weights (1-D) get no weight decay. Each group carries its real `lr`, so every torch or
    Lightning scheduler scales it and the ratios between groups hold.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            key = (lr_scale(name), parameter.ndim > 1)
            groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "lr": base_lr * scale, "weight_decay": weight_decay if decays else 0.0}
        for (scale, decays), params in sorted(groups.items(), key=lambda item: item[0])
    ]


def _groups_from_config(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    optim: Mapping[str, Any],
    lr_scale: LrScale,
) -> list[dict[str, Any]]:
    optimizer_cfg = optim["optimizer"]
    return parameter_groups(
        named_parameters,
        float(optimizer_cfg["lr"]),
        float(optimizer_cfg.get("weight_decay", 0.0)),
        lr_scale,
    )


def build_optimizer(
    module: nn.Module,
    optim: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    total_steps: int,
    steps_per_epoch: int,
    lr_scale: LrScale = uniform,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The configured optimizer (`optim.optimizer`, a Hydra partial) over `module`'s trainable
    parameters, grouped by `parameter_groups` with `lr_scale` over `module`'s parameter names,
    and its per-step schedule (`scheduler`: name plus `WarmupSchedule`'s options)."""
    optimizer_cfg = {k: v for k, v in optim["optimizer"].items() if k != "weight_decay"}
    groups = _groups_from_config(module.named_parameters(), optim, lr_scale)
    optimizer = instantiate(optimizer_cfg)(groups)
    schedule_cfg = dict(scheduler)
    schedule = WarmupSchedule(
        kind=schedule_cfg.pop("name"),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        **schedule_cfg,
    )
    return optimizer, ConfiguredLambdaLR(optimizer, schedule)


class ConfiguredLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """`LambdaLR` whose schedule comes from the config, also on resume: a checkpoint restores the
    step count (and Lightning the optimizer state), not the multipliers' horizon. Every group's
    rate is then set from this schedule at the restored step, so the first step after a resume
    already follows it (the optimizer state holds the rate the interrupted schedule gave)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {k: v for k, v in state_dict.items() if k not in ("lr_lambdas", "base_lrs")}
        self.__dict__.update(state)
        saved = [fn or {} for fn in state_dict.get("lr_lambdas") or []]
        for index, schedule in enumerate(self.lr_lambdas):
            if isinstance(schedule, WarmupSchedule):
                schedule.continue_from(self.last_epoch, saved[index] if index < len(saved) else {})
        groups = self.optimizer.param_groups
        for group, base_lr, schedule in zip(groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base_lr * schedule(self.last_epoch)
        self._last_lr = [group["lr"] for group in groups]


def add_param_groups(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    optim: Mapping[str, Any],
    lr_scale: LrScale = uniform,
) -> None:
    """Give newly trainable parameters their own groups in a running optimizer, at their own
    rates (as `build_optimizer` would have), at the schedule's current multiplier, and extend
    the per-step schedule to them. Groups are appended in a fixed order, so a resumed run that
    adds the same parameters in the same order lines up with the saved optimizer state."""
    schedule = scheduler.lr_lambdas[0]
    for group in _groups_from_config(named_parameters, optim, lr_scale):
        group["initial_lr"] = group["lr"]
        group["lr"] = group["initial_lr"] * schedule(scheduler.last_epoch)
        optimizer.add_param_group(group)
        scheduler.base_lrs.append(group["initial_lr"])
        scheduler.lr_lambdas.append(schedule)
