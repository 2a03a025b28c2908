"""The LightningModule: a network (backbone + new head), the loss, metrics, optimizer and schedule.

It holds no strategy logic: which parameters train is decided by the strategy callback before
the optimizer is built, and the optimizer only ever receives parameters that require grad.
Everything it needs arrives at construction. Its hparams are plain config values (never an
nn.Module): enough to rebuild the network offline, so `ClassifierModule.load_from_checkpoint(path)`
(or `load_classifier(path)`) works from a checkpoint alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from finetune import backbones
from finetune.backbones import Network
from finetune.errors import FinetuneError
from finetune.optim import LayerwiseRates, build_optimizer
from finetune.probe import HeadLoss
from finetune.rundir import find_checkpoint
from finetune.weights import rename_keys


def accuracy_metrics(num_classes: int, per_class_means: bool = False) -> MetricCollection:
    """Top-1 `acc` (and `acc_top5` above 5 classes); with `per_class_means` also
    `balanced_acc`, the mean of the classes' recalls, and `macro_f1`, the mean of their F1
    scores, which a large class cannot hide a small one from (a class that is neither in the
    labels nor predicted is left out of both means: torchmetrics' macro average)."""
    metrics = {"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    if per_class_means:
        metrics["balanced_acc"] = MulticlassAccuracy(num_classes=num_classes, average="macro")
        metrics["macro_f1"] = MulticlassF1Score(num_classes=num_classes, average="macro")
    return MetricCollection(metrics)


# Logged every epoch but kept off the progress bar, which shows the loss and top-1 accuracy.
OFF_PROGRESS_BAR = ("balanced_acc", "macro_f1")


class ClassifierModule(pl.LightningModule):
    """An image classifier in training: `forward` maps (batch, 3, H, W) images, or (batch,
    features) cached features when `inputs_are_features`, to (batch, classes) logits.

    Arguments:
        class_names: the classes, in label order.
        model: the model config (`finetune.backbones.build`'s `model_cfg`).
        optim, scheduler: the `optim` and `scheduler` configs (`finetune.optim.build_optimizer`).
        backbone_lr_scale: learning rate of the pretrained layers as a fraction of the head's
            (the strategy's policy; `optim.layer_decay` adds a decay per block below the head).
        network: the built network; None rebuilds it from `model` without pretrained weights
            (what `load_from_checkpoint` does: the checkpoint's state dict then fills it).
        inputs_are_features: batches hold `Network.forward_features` outputs (the cached linear
            probe); not saved, so a checkpoint always rebuilds an image classifier.
        channels_last: keep the network and its input images in NHWC layout; not saved.
        head_solved: the head was solved before fit (the linear probe, `finetune.probe`) and
            nothing trains: every parameter group's learning rate is 0, so the epoch's steps
            measure the loss and accuracy and change no weight (SGD and AdamW move a parameter
            by lr times their update), while Lightning's step count, checkpoints, gradient
            clipping, accumulation and precision plugins work as in any run; not saved.
        class_weight: the loss's weight per class, in class order (`data.class_weights`,
            `finetune.data.balance`), or None; saved, so a checkpoint says how it was trained.

    Its length (~160 lines) is Lightning's hooks for one module (steps, the deferred loss
    check, optimizers, checkpoint loading); each is short, and splitting them across classes
    would scatter one LightningModule's contract.
    """

    # Whether the finite-loss check of a training step may be read one step late (see
    # training_step); None: on accelerators only, where reading it at once stalls the device.
    defer_loss_check: bool | None = None
    # Put before the logged names of a validation outside fit (`best/val/acc`): the run
    # re-validates the best checkpoint after fit, and the `val/*` curves keep one point per epoch.
    EVALUATION_TAG = "best/"
    # An epoch whose mean training loss is this many times the loss of guessing (ln of the
    # number of classes: uniform predictions), with validation at chance, has diverged, though
    # finite: BatchNorm renormalises the exploding activations, so a far too high learning rate
    # rarely gives NaN.
    DIVERGED_LOSS_FACTOR = 20.0

    def __init__(
        self,
        class_names: list[str],
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        backbone_lr_scale: float = 1.0,
        network: Network | None = None,
        inputs_are_features: bool = False,
        channels_last: bool = False,
        head_solved: bool = False,
        class_weight: list[float] | None = None,
    ) -> None:
        super().__init__()
        # Plain values only: the checkpoint must rebuild without pickled modules. How this run
        # feeds the network (cached features, memory layout) is not part of the model.
        self.save_hyperparameters(
            ignore=["network", "inputs_are_features", "channels_last", "head_solved"],
            logger=False,
        )
        self.head_solved = head_solved
        if network is None:
            network = backbones.build(model, len(class_names), pretrained=False)
        self.network = network
        self.class_names = list(class_names)
        self.inputs_are_features = inputs_are_features
        self.channels_last = channels_last
        # One input of what this run feeds the network, for Lightning's model summary: it
        # counts FLOPs (and layer in/out sizes) by a forward pass of it; without one it prints
        # "Total FLOPs: 0". (1, D) cached features reach the head alone.
        crop = network.input_spec.crop_size
        self.example_input_array = (
            torch.zeros(1, network.num_features)
            if inputs_are_features
            else torch.zeros(1, 3, crop, crop)
        )
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        # Parameter name (as `network.net` names it) -> its rate as a multiple of the base rate.
        self.lr_scale = LayerwiseRates(
            network.blocks(), backbone_lr_scale, optim.get("layer_decay")
        )
        # The finite-loss check of the step before, when it is read one step late.
        self._pending_loss_check: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        # This epoch's training losses, summed on the device (read once, at its last batch).
        self._epoch_loss_sum: torch.Tensor | float = 0.0
        self._epoch_loss_steps = 0
        # The objective the solved linear probe minimises too (one loss for the head); its class
        # weights a buffer, so that they move to the training device with the network.
        self.label_smoothing = float(optim.get("label_smoothing", 0))
        weight = None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        # ModuleDict keys may not shadow nn.Module attributes such as `train`. The per-class
        # means are evaluation numbers: training batches are augmented and (with a balanced
        # sampler) not drawn as the split is.
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": accuracy_metrics(
                    len(class_names), per_class_means=stage != "train"
                ).clone(prefix=f"{stage}/")
                for stage in ("train", "val", "test")
            }
        )
        # Mean evaluation loss per image, weighted by batch size (see _shared_step). A NaN loss
        # is kept as NaN: torchmetrics' default drops it with a warning, and its "disable"
        # ignores the weights (torchmetrics 1.9).
        self.eval_losses = nn.ModuleDict(
            {stage: MeanMetric(nan_strategy=float("nan")) for stage in ("val", "test")}
        )

    @property
    def criterion(self) -> HeadLoss:
        """The training loss: cross-entropy with the label smoothing and class weights."""
        return HeadLoss(self.label_smoothing, self.class_weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (batch, features): cached features (the solved probe's train and val splits; its test
        # split stays images)
        if images.ndim == 2:
            return self.network.forward_head(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.network(images)

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits, labels)
        outside_fit = stage == "val" and self.trainer.state.fn == TrainerFn.VALIDATING
        prefix = self.EVALUATION_TAG if outside_fit else ""
        if stage == "train":
            # Every process trains on a share of the same size (Lightning's distributed sampler
            # pads the split), so sync_dist's mean of the processes' means is exact here.
            self.log(
                f"{prefix}train/loss",
                loss,
                on_step=True,
                on_epoch=True,
                prog_bar=True,
                sync_dist=True,
                batch_size=len(labels),
            )
        else:
            # Evaluation shares may differ by one image (finetune.data.loading.
            # evaluation_sampler). Lightning's sync_dist divides the processes' summed image
            # counts as integers, which rounds them down for uneven shares; torchmetrics' mean
            # adds float sums and weights, so the loss is that of the whole split.
            mean_loss = self.eval_losses[stage]
            mean_loss.update(loss.detach(), len(labels))
            self.log(
                f"{prefix}{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True
            )
        # The torchmetrics metrics add up their counts over the processes likewise.
        for name, metric in metrics.items(keep_base=False, copy_state=False):
            shown = stage != "train" and not name.endswith(OFF_PROGRESS_BAR)
            self.log(f"{prefix}{name}", metric, on_step=False, on_epoch=True, prog_bar=shown)
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")[0]
        check = (torch.isfinite(loss), loss.detach(), self.trainer.global_step, batch_idx)
        self._epoch_loss_sum = self._epoch_loss_sum + loss.detach()
        self._epoch_loss_steps += 1
        pending, self._pending_loss_check = self._pending_loss_check, None
        if pending is not None:
            self.stop_if_diverged(*pending)
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
            self.stop_if_diverged(*check)
        if last_of_epoch:  # before validation, and so before this epoch's checkpoints
            self.stop_if_exploded()
        return loss

    def stop_if_exploded(self) -> None:
        """Raise `FinetuneError` when this epoch's mean training loss (averaged over the
        processes) is above `DIVERGED_LOSS_FACTOR` times ln(classes), the loss of guessing, and
        the last validation was at chance (val/acc at most 1/classes + 0.05): finite, but
        diverged. A huge loss of a model that still validates well (a solved probe's
        over-confident head while the features move) is no divergence."""
        if not self._epoch_loss_steps:
            return
        mean = self._epoch_loss_sum / self._epoch_loss_steps
        mean = float(self.trainer.strategy.reduce(torch.as_tensor(mean), reduce_op="mean"))
        classes = len(self.class_names)
        guessing = math.log(classes)
        validated = self.trainer.callback_metrics.get("val/acc")
        at_chance = validated is not None and float(validated) <= 1 / classes + 0.05
        if not (mean > self.DIVERGED_LOSS_FACTOR * guessing and at_chance):  # NaN: the step's
            return
        lr = float(self.hparams.optim["optimizer"]["lr"])  # resolved: `auto` chose it if unset
        raise FinetuneError(
            f"Training diverged: the mean training loss of epoch {self.current_epoch} is "
            f"{mean:.3g}, {mean / guessing:.0f} times the loss of guessing among {classes} "
            f"classes (ln {classes} = {guessing:.2f}), though finite, and val/acc is at chance "
            f"({float(validated):.3f}). The learning rate is far too high "
            f"(optim.optimizer.lr={lr:g}). The checkpoints written before are intact. Fix: "
            f"start again with a tenth of it, optim.optimizer.lr={lr / 10:g}."
        )

    def stop_if_diverged(
        self, finite: torch.Tensor, loss: torch.Tensor, step: int, batch_idx: int
    ) -> None:
        """Raise `FinetuneError` when a step's loss was not finite. `finite`: a 0-d bool tensor,
        `loss` the 0-d loss of optimizer step `step` (batch `batch_idx` of the epoch). Reading
        `finite` waits for the device; `training_step` calls this one step late on accelerators
        (public so that tests can observe when each step's check runs)."""
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
        self._epoch_loss_sum, self._epoch_loss_steps = 0.0, 0

    # Evaluation steps return the logits, for reports (finetune.reports: classes, losses,
    # calibration).
    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")[1].detach()

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")[1].detach()

    def configure_optimizers(self) -> dict[str, Any]:
        total_steps = int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(
            self.network.net,
            self.hparams.optim,
            self.hparams.scheduler,
            total_steps=total_steps,
            steps_per_epoch=total_steps // max(self.trainer.max_epochs or 1, 1),
            lr_scale=(lambda _name: 0.0) if self.head_solved else self.lr_scale,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints from before the holder was renamed keep the network under `backbone.`;
        # Lightning calls this hook before it loads the state dict (resume, evaluation, and
        # `load_from_checkpoint` alike).
        checkpoint["state_dict"] = rename_keys(checkpoint["state_dict"], "lightning_legacy")


def load_classifier(checkpoint_path: str | Path) -> ClassifierModule:
    """A trained image classifier from one of this project's checkpoints, on the CPU, in eval
    mode, offline: `ClassifierModule.load_from_checkpoint` without pickled code. Its
    `class_names` name the logits; `network.input_spec` is the preprocessing it expects.
    `checkpoint_path`: a `.ckpt` file, or a run dir (its best checkpoint, as predict.py and
    export.py take it). Raises `FinetuneError` for a run dir without checkpoints or a path
    that does not exist."""
    module = ClassifierModule.load_from_checkpoint(
        find_checkpoint(checkpoint_path), map_location="cpu", weights_only=True
    )
    return module.eval()


def countable_example(module: ClassifierModule) -> torch.Tensor | None:
    """`module.example_input_array` when torch's FLOP counter traces the network with it, else
    None (the model summary then shows layers and parameters without FLOPs).

    Lightning's model summary counts FLOPs by one forward of that input under `torch.no_grad()`
    and `FlopCounterMode`, whose module tracker raises "Expected gradient function to be set"
    when a view of a trainable parameter reaches a submodule (timm's PiT hands its expanded class
    token to its pooling layers): that would stop the run before its first step.
    """
    example = module.example_input_array
    if example is None:
        return None
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False):
            module(example)
    except (AssertionError, RuntimeError):
        return None
    finally:
        module.train(was_training)
    return example
