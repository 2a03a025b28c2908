"""The LightningModule: a backbone with its head, the loss, metrics, optimizer and schedule.

It holds no strategy logic: which parameters train is decided by the strategy callback before
the optimizer is built, and the optimizer only ever receives parameters that require grad.
Its hparams are plain config dicts (never an nn.Module), enough to rebuild the network from a
checkpoint with `load_classifier`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from finetune import backbones
from finetune.backbones import Backbone
from finetune.errors import FinetuneError, unknown_name


def accuracy_metrics(num_classes: int) -> MetricCollection:
    metrics = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class WarmupSchedule:
    """Learning-rate multiplier per optimizer step: linear warmup, then cosine, step or constant.

    A callable object (not a lambda) so that LambdaLR can save and restore it in checkpoints. The
    multiplier applies to every param group alike, so ratios between groups are preserved.
    """

    KINDS = ("cosine", "step", "constant")

    def __init__(
        self,
        kind: str,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        step_epochs: int = 7,
        gamma: float = 0.1,
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

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** (step // (self.step_epochs * self.steps_per_epoch))
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    base_lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
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


class ClassifierModule(pl.LightningModule):
    # Whether the finite-loss check of a training step may be read one step late (see
    # training_step); None: on accelerators only, where reading it at once stalls the device.
    defer_loss_check: bool | None = None

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        backbone_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # Plain dicts only: the checkpoint must rebuild without pickled modules.
        self.save_hyperparameters(ignore=["backbone"], logger=False)
        self.backbone = backbone
        self.class_names = list(class_names)
        # Set by the run, not saved in hparams: a checkpoint always rebuilds an image classifier.
        self.inputs_are_features = False  # batches hold cached `forward_features` outputs
        self.channels_last = False  # feed images in NHWC layout (set with the network's layout)
        self._depths: dict[str, int] | None = None  # parameter name -> blocks from the top
        # The finite-loss check of the step before, when it is read one step late.
        self._pending_loss_check: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=float(optim.get("label_smoothing", 0)))
        metrics = accuracy_metrics(len(class_names))
        # ModuleDict keys may not shadow nn.Module attributes such as `train`.
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": metrics.clone(prefix=f"{stage}/")
                for stage in ("train", "val", "test")
            }
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.inputs_are_features:
            return self.backbone.forward_head(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits, labels)
        on_step = stage == "train"
        # sync_dist: with several devices the epoch loss is averaged over all of them.
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")[0]
        check = (torch.isfinite(loss), loss.detach(), self.trainer.global_step, batch_idx)
        pending, self._pending_loss_check = self._pending_loss_check, None
        if pending is not None:
            self._stop_if_diverged(*pending)
        defer = self.defer_loss_check
        if defer is None:
            defer = loss.device.type != "cpu"
        last_of_epoch = batch_idx + 1 >= self.trainer.num_training_batches
        if defer and not last_of_epoch:
            # Reading a value back from an accelerator waits for all the work queued on it, so
            # checking this loss now would idle the device every step. The previous step's
            # loss (checked above) was computed before this step's forward pass, so reading it
            # costs no idle time; a diverged step is then caught one step late, and always
            # before the epoch ends, when checkpoints are written.
            self._pending_loss_check = check
        else:
            self._stop_if_diverged(*check)
        return loss

    def _stop_if_diverged(
        self, finite: torch.Tensor, loss: torch.Tensor, step: int, batch_idx: int
    ) -> None:
        if bool(finite):
            return
        # Raised before the next checkpoint: the ones written so far (checkpoints/last.ckpt:
        # the last finished epoch) stay as they are.
        self._pending_loss_check = None
        raise FinetuneError(
            f"The training loss became {loss.item()} at step {step} "
            f"(epoch {self.current_epoch}, batch {batch_idx}): training diverged. The "
            "checkpoints written before are intact. Fix: lower optim.optimizer.lr, check the "
            "data for broken labels or images, then start again or resume with ckpt_path=last."
        )

    def on_train_epoch_start(self) -> None:
        self._pending_loss_check = None

    # Evaluation steps return the predicted classes, for reports (finetune.reports).
    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")[1].argmax(dim=1)

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")[1].argmax(dim=1)

    def lr_scale(self, parameter_name: str) -> float:
        """Learning rate of a parameter as a multiple of the base rate.

        The new head learns at the base rate. Below it, pretrained layers learn at
        `backbone_lr_scale` of it, times `optim.layer_decay ** depth` when layer decay is on,
        where depth counts blocks from the top (the top block is 1).
        """
        if self._depths is None:
            blocks = self.backbone.blocks()
            self._depths = {
                f"backbone.{name}": len(blocks) - index
                for index, block in enumerate(blocks)
                for name in block
            }
        depth = self._depths.get(parameter_name, 0)  # the head is not in any block
        if depth == 0:
            return 1.0
        decay = self.hparams.optim.get("layer_decay")
        return float(self.hparams.backbone_lr_scale) * (float(decay) ** depth if decay else 1.0)

    def add_param_groups(self, parameter_names: list[str]) -> None:
        """Give newly unfrozen parameters their own groups in the running optimizer, at their
        own learning rate, and extend the per-step schedule to the new groups."""
        optimizer = self.trainer.optimizers[0]
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        wanted = set(parameter_names)
        optimizer_cfg = self.hparams.optim["optimizer"]
        groups = parameter_groups(
            ((n, p) for n, p in self.named_parameters() if n in wanted),
            float(optimizer_cfg["lr"]),
            float(optimizer_cfg.get("weight_decay", 0.0)),
            self.lr_scale,
        )
        schedule = scheduler.lr_lambdas[0]
        for group in groups:
            group["initial_lr"] = group["lr"]
            group["lr"] = group["initial_lr"] * schedule(scheduler.last_epoch)
            optimizer.add_param_group(group)
            scheduler.base_lrs.append(group["initial_lr"])
            scheduler.lr_lambdas.append(schedule)

    def configure_optimizers(self) -> dict[str, Any]:
        total_steps = int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(
            self,
            self.hparams.optim,
            self.hparams.scheduler,
            total_steps=total_steps,
            steps_per_epoch=total_steps // max(self.trainer.max_epochs or 1, 1),
            lr_scale=self.lr_scale,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def build_optimizer(
    module: nn.Module,
    optim: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    total_steps: int,
    steps_per_epoch: int,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The configured optimizer over `module`'s trainable parameters, and its per-step schedule."""
    optimizer_cfg = dict(optim["optimizer"])
    weight_decay = float(optimizer_cfg.pop("weight_decay", 0.0))
    groups = parameter_groups(
        module.named_parameters(), float(optimizer_cfg["lr"]), weight_decay, lr_scale
    )
    optimizer = instantiate(optimizer_cfg)(groups)
    schedule_cfg = dict(scheduler)
    schedule = WarmupSchedule(
        kind=schedule_cfg.pop("name"),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        **schedule_cfg,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def load_classifier(checkpoint_path: str | Path) -> ClassifierModule:
    """Rebuild a trained classifier from one of this project's checkpoints (no download)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    backbone = backbones.build(hparams["model"], len(hparams["class_names"]), pretrained=False)
    module = ClassifierModule(backbone, **hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
