"""Which parameters train: freeze strategies as a Lightning callback.

The callback decides the trainable set in `setup`, before Lightning builds the optimizer, so the
optimizer only ever sees trainable parameters. Frozen parts of the network are put in eval mode,
not only `requires_grad=False`: a frozen BatchNorm in train mode would still normalise with batch
statistics and overwrite its running statistics.

Strategies (the new head always trains):
- last_layer: only the head; the whole backbone is frozen and in eval mode.
- top_k:      the head and the top k blocks (`Backbone.blocks()`).
- regex:      the head and the parameters whose names match `train` and not `freeze`.
- gradual:    the head, then one more block every n epochs (or on a val/acc plateau).
- full:       every layer, starting from the pretrained weights.
- scratch:    every layer, starting from random initialisation (the baseline).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from torch import nn

from finetune.backbones import Backbone
from finetune.errors import FinetuneError, unknown_name

log = logging.getLogger(__name__)

STRATEGIES = ("last_layer", "top_k", "regex", "gradual", "full", "scratch")
# What BatchNorm layers inside the trainable part do (frozen parts are always in eval mode):
#   train:        batch statistics in training, running statistics and affine parameters update;
#   train_affine: eval mode (running statistics fixed), affine parameters train;
#   frozen:       eval mode and affine parameters frozen too.
BN_POLICIES = ("train", "train_affine", "frozen")


def count_parameters(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "total_params": total,
    }


def frozen_subtrees(module: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen.

    Parameter-free modules (activations, dropout) take their parent's state, so a dropout right
    before a trainable head keeps working while a frozen feature extractor goes to eval mode.
    """
    parameters = list(module.parameters())
    if parameters and not any(p.requires_grad for p in parameters):
        return [module]
    return [frozen for child in module.children() for frozen in frozen_subtrees(child)]


class FreezeStrategy(pl.Callback):
    """Sets `requires_grad` per strategy before the optimizer exists, and keeps frozen parts in
    eval mode for the whole fit."""

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        backbone_lr_scale: float = 1.0,
        bn: str = "train",
        k: int = 1,
        train: list[str] | None = None,
        freeze: list[str] | None = None,
        every_n_epochs: int = 1,
        on_plateau: bool = False,
        patience: int = 1,
        cache_features: bool | str = False,
        **_: Any,
    ) -> None:
        if name not in STRATEGIES:
            raise unknown_name("strategy", name, STRATEGIES)
        if bn not in BN_POLICIES:
            raise unknown_name("strategy.bn policy", bn, BN_POLICIES)
        self.name = name
        self.bn = bn
        self.k = int(k)  # top_k: how many of the top blocks train besides the head
        # regex: patterns (re.search) over parameter names as the network names them
        self.train_patterns = list(train or [])
        self.freeze_patterns = list(freeze or [])
        self.pretrained = pretrained and name != "scratch"  # no config key: scratch is random init
        if cache_features not in (True, False, "auto"):
            raise unknown_name(
                "strategy.cache_features", str(cache_features), ["auto", "true", "false"]
            )
        if cache_features is True and name != "last_layer":
            raise FinetuneError(
                f"strategy.cache_features=true needs a frozen backbone, but strategy={name} "
                "trains part of it. Fix: use strategy=last_layer, or drop cache_features."
            )
        self.cache_features = cache_features
        # Pretrained layers learn at this fraction of the head's rate, so the randomly
        # initialised head's first, noisy gradients do not wreck the features beneath it.
        self.backbone_lr_scale = backbone_lr_scale
        # gradual: one more block every `every_n_epochs`, or after `patience` epochs without a
        # better val/acc when `on_plateau`. `unfrozen` and the plateau tracking are the state a
        # checkpoint keeps, so a resumed run continues the same schedule.
        self.every_n_epochs = max(int(every_n_epochs), 1)
        self.on_plateau = on_plateau
        self.patience = max(int(patience), 1)
        self.unfrozen = 0
        self.best_val_acc = float("-inf")
        self.epochs_without_improvement = 0
        self._eval_modules: list[nn.Module] = []

    def caches_features(self, augmenting: bool) -> bool:
        """Whether the head trains on features computed once (`finetune.features`): only when the
        backbone is frozen, and only without augmentation (which cached features cannot have)."""
        if self.cache_features is True:
            if augmenting:
                log.warning(
                    "strategy.cache_features=true: training images get the eval preprocessing "
                    "(augmentation is off), so the backbone's features are computed once."
                )
            return True
        return self.cache_features == "auto" and self.name == "last_layer" and not augmenting

    def trainable_names(self, backbone: Backbone) -> set[str]:
        """Parameter names (as `backbone.named_parameters()` gives them) that train. The new,
        randomly initialised head always trains."""
        head = backbone.head_parameter_names()
        if self.name == "last_layer":
            return head
        if self.name in ("top_k", "gradual"):
            count = self.k if self.name == "top_k" else self.unfrozen
            blocks = backbone.blocks()
            top_blocks = blocks[len(blocks) - count :] if count > 0 else []
            return head | {name for block in top_blocks for name in block}
        if self.name == "regex":

            def matches(patterns: list[str], name: str) -> bool:
                return any(re.search(pattern, name) for pattern in patterns)

            chosen = {
                name
                for name, _ in backbone.named_parameters()
                if matches(self.train_patterns, name.removeprefix("net."))
                and not matches(self.freeze_patterns, name.removeprefix("net."))
            }
            return head | chosen
        return {name for name, _ in backbone.named_parameters()}

    def apply(self, backbone: Backbone) -> dict[str, int]:
        """Freeze `backbone` per this strategy; returns the parameter counts."""
        trainable = self.trainable_names(backbone)
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad_(name in trainable)
        batch_norms = [
            m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if self.bn == "frozen":
            for layer in batch_norms:
                layer.requires_grad_(False)
        self._eval_modules = frozen_subtrees(backbone)
        if self.bn != "train":
            self._eval_modules += batch_norms
        self._set_eval_modes()
        return count_parameters(backbone)

    def _set_eval_modes(self) -> None:
        for module in self._eval_modules:
            module.eval()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        counts = self.apply(pl_module.backbone)
        log.info(
            "Strategy %s: %s trainable / %s frozen parameters (of %s)",
            self.name,
            f"{counts['trainable_params']:,}",
            f"{counts['frozen_params']:,}",
            f"{counts['total_params']:,}",
        )
        if self.name == "regex":
            trainable = [n for n, p in pl_module.backbone.named_parameters() if p.requires_grad]
            log.info("Trainable parameters:\n  %s", "\n  ".join(trainable))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.name == "gradual":
            if self.on_plateau:
                due = self.epochs_without_improvement >= self.patience
            else:
                due = trainer.current_epoch > 0 and trainer.current_epoch % self.every_n_epochs == 0
            if due:
                self.unfreeze_next_block(pl_module, epoch=trainer.current_epoch)
                self.epochs_without_improvement = 0
        # Lightning or user code may have called .train() on the whole module since setup.
        self._set_eval_modes()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.name != "gradual" or trainer.sanity_checking or not self.on_plateau:
            return
        val_acc = trainer.callback_metrics.get("val/acc")
        if val_acc is None:
            return
        if float(val_acc) > self.best_val_acc:
            self.best_val_acc = float(val_acc)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1

    def unfreeze_next_block(self, pl_module: pl.LightningModule, epoch: int) -> None:
        """Unfreeze the next block down and give it its own param groups in the running
        optimizer (and schedule)."""
        backbone = pl_module.backbone
        blocks = backbone.blocks()
        if self.unfrozen >= len(blocks):
            return
        self.unfrozen += 1
        block = blocks[len(blocks) - self.unfrozen]
        backbone.train()  # the block's modules leave eval mode; frozen parts return to it below
        self.apply(backbone)
        new_names = [f"backbone.{name}" for name in block]
        pl_module.add_param_groups(new_names)
        log.info("Epoch %d: unfroze block %d from the top (%s ...)", epoch, self.unfrozen, block[0])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming: the optimizer was just built for the head alone; unfreeze the blocks the
        # checkpoint had unfrozen, in the same order, so that its param groups (and then the
        # optimizer and scheduler states Lightning restores next) line up exactly.
        if self.name == "gradual" and self.unfrozen > 0:
            restored, self.unfrozen = self.unfrozen, 0
            self.apply(pl_module.backbone)
            for _ in range(restored):
                self.unfreeze_next_block(pl_module, epoch=trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "unfrozen": self.unfrozen,
            "best_val_acc": self.best_val_acc,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = int(state_dict.get("unfrozen", 0))
        self.best_val_acc = float(state_dict.get("best_val_acc", float("-inf")))
        self.epochs_without_improvement = int(state_dict.get("epochs_without_improvement", 0))


def build(strategy_cfg: Mapping[str, Any]) -> FreezeStrategy:
    return FreezeStrategy(**strategy_cfg)
