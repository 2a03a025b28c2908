"""Which parameters train: one Lightning callback per freeze strategy.

In the spirit of Lightning's `BaseFinetuning` (subclasses override hooks), but that class turns
off `track_running_stats` of frozen BatchNorm layers and leaves the schedule alone; here frozen
parts go to eval mode and added param groups join the running schedule.

`FreezeStrategy`, the base, owns what every strategy shares: it decides the trainable set in
`setup`, before Lightning builds the optimizer (so the optimizer only ever sees trainable
parameters); it puts frozen parts in eval mode, not only `requires_grad=False` (a frozen
BatchNorm in train mode would still normalise with batch statistics and overwrite its running
statistics), keeps them there for the whole fit, applies the BatchNorm policy `bn`, logs the
counts, and saves its subclass's state in checkpoints. A subclass says which backbone parameters
train (`trainable_names`); the new head always trains.

Strategies:
- last_layer: only the head; the whole backbone is frozen and in eval mode.
- top_k:      the head and the top k blocks (`Network.blocks()`).
- regex:      the head and the parameters whose names match `train` and not `freeze`.
- gradual:    the head, then one more block every n epochs (or on a val/acc plateau).
- full:       every layer, starting from the pretrained weights.
- lp_ft:      the linear probe first (the head solved on cached features), then every layer.
- scratch:    every layer, starting from random initialisation (the baseline).

Whether the head trains on cached features is the run's decision (`caches_features`), from the
strategy, `strategy.cache_features` and the augmentation. A strategy whose `head_from_probe` is
true gets its head solved before fit (`finetune.probe`, run by `finetune.run.fit`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import pytorch_lightning as pl
from torch import nn

from finetune import callbacks, optim
from finetune.backbones import Network
from finetune.config.schema import (
    STEM_PATTERNS,
    FullConfig,
    GradualConfig,
    LastLayerConfig,
    LpFtConfig,
    RegexConfig,
    ScratchConfig,
    TopKConfig,
)
from finetune.errors import FinetuneError, unknown_name

log = logging.getLogger(__name__)


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


def top_blocks(network: Network, count: int) -> set[str]:
    """Parameter names of the top `count` blocks below the head."""
    blocks = network.blocks()
    return {
        name for block in (blocks[len(blocks) - count :] if count > 0 else []) for name in block
    }


class FreezeStrategy(pl.Callback):
    """Base of the strategies: sets `requires_grad` before the optimizer exists and keeps frozen
    parts in eval mode for the whole fit. Subclasses set `name`, `pretrained` (whether the
    network starts from pretrained weights) and override `trainable_names`; `STATE` names the
    attributes saved in checkpoints."""

    name: ClassVar[str]
    pretrained: ClassVar[bool] = True
    trains_backbone: ClassVar[bool] = True  # False: the backbone stays frozen for the whole fit
    STATE: ClassVar[tuple[str, ...]] = ()
    # True: the head starts from the linear probe solved on cached features (finetune.probe)
    head_from_probe: bool = False
    # True: the new head starts at zero, as in BiT (Kolesnikov et al. 2020, "Big Transfer
    # (BiT): General Visual Representation Learning"): its first steps send no random
    # gradients into the features beneath it, which a random head's do (Kumar et al. 2022).
    # Measured with efficientnet_lite0, full, against nn.Linear's random initialisation:
    # hymenoptera val acc 0.9520 against 0.9455 (mean of seeds 0-2); Flowers102 0.9196 against
    # 0.9206 at the end, ahead on the way (0.466 against 0.309 after epoch 0).
    zero_head: ClassVar[bool] = True
    # Keys of this strategy's config that the run reads, not the strategy.
    RUN_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, bn: str = "train", backbone_lr_scale: float = 1.0) -> None:
        # `bn` is one of `finetune.config.schema.BN_POLICIES`, checked with the config
        self.bn = bn
        # Pretrained layers learn at this fraction of the head's rate, so the randomly
        # initialised head's first, noisy gradients do not wreck the features beneath it.
        self.backbone_lr_scale = float(backbone_lr_scale)
        self._eval_modules: list[nn.Module] = []
        # How the head was solved before fit (finetune.probe's report), kept in checkpoints so
        # that a resumed run reports it as the uninterrupted run does.
        self.probe_report: dict[str, Any] = {}
        # What the feature cache did for the run (metrics.json's feature_cache*), kept in
        # checkpoints for the same reason: a resume reads the file the first process wrote.
        self.feature_report: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        # One strategy per run; checkpoints of every strategy (and of older versions of this
        # project) keep its state under this key, so a resumed run finds it.
        return "FreezeStrategy"

    def trainable_names(self, network: Network) -> set[str]:
        """Backbone parameter names (as `network.net` names them) that train besides the head."""
        raise NotImplementedError

    def init_head(self, network: Network) -> None:
        """Start the new head at zero when `zero_head` (else it keeps `nn.Linear`'s random
        initialisation, `finetune.backbones.build`)."""
        if self.zero_head:
            network.zero_head()

    def apply(self, network: Network) -> dict[str, int]:
        """Freeze `network` per this strategy; returns the parameter counts."""
        trainable = self.trainable_names(network) | network.head_parameter_names()
        for name, parameter in network.net.named_parameters():
            parameter.requires_grad_(name in trainable)
        batch_norms = [
            m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if self.bn == "frozen":
            for layer in batch_norms:
                layer.requires_grad_(False)
        self._eval_modules = frozen_subtrees(network)
        if self.bn != "train":
            self._eval_modules += batch_norms
        self._set_eval_modes()
        return count_parameters(network)

    def _set_eval_modes(self) -> None:
        for module in self._eval_modules:
            module.eval()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        counts = self.apply(pl_module.network)
        log.info(
            "Strategy %s: %s trainable / %s frozen parameters (of %s)",
            self.name,
            f"{counts['trainable_params']:,}",
            f"{counts['frozen_params']:,}",
            f"{counts['total_params']:,}",
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The head starts from the solved linear probe and trains on (lp_ft; last_layer on
        # images): the probe itself competes for the best checkpoint, so training on never
        # returns a model worse on val than the one it started from (selection on val, as
        # between epochs). It is validated as every epoch is (Lightning's own validation loop:
        # the same metrics, precision, limit_val_batches and processes), not by the probe's
        # solve, whose numbers come from other arithmetic.
        keepers = [c for c in trainer.checkpoint_callbacks if c.monitor and c.save_top_k != 0]
        if not self.probe_report or pl_module.head_solved or not keepers:
            return
        if trainer.global_step > 0 or trainer.fast_dev_run:  # a resume; a smoke test
            return
        trainer.validating = True  # as Lightning's training epoch loop runs its validation
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        self._set_eval_modes()  # the validation loop put the whole module back in train mode
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        for checkpoint in keepers:
            path = callbacks.keep_as_candidate(checkpoint, trainer, "probe", metrics)
            if path and trainer.is_global_zero:
                value = metrics[checkpoint.monitor]
                log.info(
                    "The linear probe (%s %.4f) is kept as %s", checkpoint.monitor, value, path
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning or user code may have called .train() on the whole module since setup.
        self._set_eval_modes()

    def state_dict(self) -> dict[str, Any]:
        reports = {"probe_report": self.probe_report, "feature_report": self.feature_report}
        return {key: getattr(self, key) for key in self.STATE} | reports

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in self.STATE:
            if key in state_dict:
                setattr(self, key, type(getattr(self, key))(state_dict[key]))
        self.probe_report = dict(state_dict.get("probe_report") or {})
        self.feature_report = dict(state_dict.get("feature_report") or {})


class LastLayer(FreezeStrategy):
    """Only the new head trains; the whole backbone, BatchNorm statistics included, is frozen."""

    name = "last_layer"
    trains_backbone = False
    # the head is the solved probe, or random as strategy.head_init=random says
    zero_head = False
    RUN_KEYS = ("cache_features", "augmented_views")

    def __init__(self, head_init: str = LastLayerConfig.head_init) -> None:
        super().__init__(bn="frozen")
        # `head_init` is one of `finetune.config.schema.HEAD_INITS`, checked with the config
        self.head_from_probe = head_init == "probe"

    def trainable_names(self, network: Network) -> set[str]:
        return set()


class TopK(FreezeStrategy):
    """The head and the top `k` blocks of the backbone train."""

    name = "top_k"

    def __init__(
        self,
        k: int = TopKConfig.k,
        backbone_lr_scale: float = TopKConfig.backbone_lr_scale,
        bn: str = TopKConfig.bn,
    ) -> None:
        super().__init__(bn=bn, backbone_lr_scale=backbone_lr_scale)
        self.k = int(k)

    def trainable_names(self, network: Network) -> set[str]:
        blocks = len(network.blocks())
        if self.k > blocks:  # top_blocks would take them all: strategy=full under another name
            raise FinetuneError(
                f"strategy.k={self.k} asks for more blocks than the {blocks} that {network.name} "
                f"has below its head. Fix: strategy.k={blocks} or less (strategy.k={blocks} "
                "trains every block, as strategy=full does)."
            )
        return top_blocks(network, self.k)


class Regex(FreezeStrategy):
    """The head and the parameters whose names (as the network names them) match a `train`
    pattern and no `freeze` pattern (`re.search`)."""

    name = "regex"

    def __init__(
        self,
        train: list[str] | None = None,
        freeze: list[str] | None = None,
        backbone_lr_scale: float = RegexConfig.backbone_lr_scale,
        bn: str = RegexConfig.bn,
    ) -> None:
        # None: the schema's defaults (RegexConfig: everything but the stem)
        super().__init__(bn=bn, backbone_lr_scale=backbone_lr_scale)
        self.train_patterns = list([".*"] if train is None else train)
        self.freeze_patterns = list(STEM_PATTERNS if freeze is None else freeze)

    def trainable_names(self, network: Network) -> set[str]:
        def matches(patterns: list[str], name: str) -> bool:
            return any(re.search(pattern, name) for pattern in patterns)

        return {
            name
            for name, _ in network.net.named_parameters()
            if matches(self.train_patterns, name) and not matches(self.freeze_patterns, name)
        }

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            net = pl_module.network.net
            trainable = [n for n, p in net.named_parameters() if p.requires_grad]
            log.info("Trainable parameters:\n  %s", "\n  ".join(trainable))


class Gradual(FreezeStrategy):
    """The head first, then one more block from the top every `every_n_epochs`, or after
    `patience` epochs without a better val/acc when `on_plateau`. Each block joins the running
    optimizer as its own param groups (`finetune.optim.add_param_groups`). `unfrozen` and the
    plateau tracking are saved in checkpoints, so a resumed run continues the same schedule."""

    name = "gradual"
    STATE = ("unfrozen", "best_val_acc", "epochs_without_improvement")

    def __init__(
        self,
        every_n_epochs: int = GradualConfig.every_n_epochs,
        on_plateau: bool = GradualConfig.on_plateau,
        patience: int = GradualConfig.patience,
        backbone_lr_scale: float = GradualConfig.backbone_lr_scale,
        bn: str = GradualConfig.bn,
    ) -> None:
        super().__init__(bn=bn, backbone_lr_scale=backbone_lr_scale)
        self.every_n_epochs = max(int(every_n_epochs), 1)
        self.on_plateau = bool(on_plateau)
        self.patience = max(int(patience), 1)
        self.unfrozen = 0
        self.best_val_acc = float("-inf")
        self.epochs_without_improvement = 0

    def trainable_names(self, network: Network) -> set[str]:
        return top_blocks(network, self.unfrozen)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming: the optimizer was just built for the head alone; unfreeze the blocks the
        # checkpoint had unfrozen, in the same order, so that its param groups (and then the
        # optimizer and scheduler states Lightning restores next) line up exactly.
        if self.unfrozen > 0:
            restored, self.unfrozen = self.unfrozen, 0
            self.apply(pl_module.network)
            for _ in range(restored):
                self.unfreeze_next_block(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_plateau:
            due = self.epochs_without_improvement >= self.patience
        else:
            due = trainer.current_epoch > 0 and trainer.current_epoch % self.every_n_epochs == 0
        if due:
            self.unfreeze_next_block(trainer, pl_module)
            self.epochs_without_improvement = 0
        super().on_train_epoch_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.on_plateau:
            return
        val_acc = trainer.callback_metrics.get("val/acc")
        if val_acc is None:
            return
        if float(val_acc) > self.best_val_acc:
            self.best_val_acc = float(val_acc)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1

    def unfreeze_next_block(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unfreeze the next block down and give it its own param groups in the running
        optimizer and schedule."""
        network = pl_module.network
        blocks = network.blocks()
        if self.unfrozen >= len(blocks):
            return
        self.unfrozen += 1
        block = blocks[len(blocks) - self.unfrozen]
        joining = set(block)
        network.train()  # the block's modules leave eval mode; frozen parts return to it below
        self.apply(network)
        optim.add_param_groups(
            trainer.optimizers[0],
            trainer.lr_scheduler_configs[0].scheduler,
            [(n, p) for n, p in network.net.named_parameters() if n in joining],
            pl_module.hparams.optim,
            pl_module.lr_scale,
        )
        log.info(
            "Epoch %d: unfroze block %d from the top (%s ...)",
            trainer.current_epoch,
            self.unfrozen,
            block[0],
        )


class Full(FreezeStrategy):
    """Every layer trains, starting from the pretrained weights."""

    name = "full"

    def __init__(
        self, backbone_lr_scale: float = FullConfig.backbone_lr_scale, bn: str = FullConfig.bn
    ) -> None:
        super().__init__(bn=bn, backbone_lr_scale=backbone_lr_scale)

    def trainable_names(self, network: Network) -> set[str]:
        return {name for name, _ in network.net.named_parameters()}


class LpFt(Full):
    """LP-FT (Kumar et al. 2022): the head is solved as a linear probe first, then every layer
    trains from it, by default all at the same rate."""

    name = "lp_ft"
    head_from_probe = True

    def __init__(
        self, backbone_lr_scale: float = LpFtConfig.backbone_lr_scale, bn: str = LpFtConfig.bn
    ) -> None:
        super().__init__(backbone_lr_scale=backbone_lr_scale, bn=bn)


class Scratch(Full):
    """Every layer trains from random initialisation, all at the full rate: the baseline that
    shows what the pretrained weights are worth."""

    name = "scratch"
    pretrained = False

    def __init__(self, bn: str = ScratchConfig.bn) -> None:
        super().__init__(backbone_lr_scale=1.0, bn=bn)


STRATEGIES: dict[str, type[FreezeStrategy]] = {
    cls.name: cls for cls in (LastLayer, TopK, Regex, Gradual, Full, LpFt, Scratch)
}


def build(strategy_cfg: Mapping[str, Any]) -> FreezeStrategy:
    """The strategy callback a `strategy` config names. Its keys and values were checked against
    the schema when the config was composed (`finetune.config.validate`); raises
    `UnknownNameError` for an unknown name."""
    cfg = dict(strategy_cfg)
    name = cfg.pop("name", None)
    if name not in STRATEGIES:
        raise unknown_name("strategy", str(name), list(STRATEGIES))
    cls = STRATEGIES[name]
    return cls(**{key: value for key, value in cfg.items() if key not in cls.RUN_KEYS})


def training_regime(strategy: FreezeStrategy, caches_features: bool) -> str:
    """How a run trains, one of `finetune.config.schema.REGIMES`: probe = the head solved on
    cached features (with augmentation: also on augmented views) is the whole training; head =
    a frozen backbone's head trains by the optimizer; from_probe = every layer trains from a
    solved head (lp_ft); finetune = the rest."""
    if not strategy.trains_backbone:
        return "probe" if caches_features and strategy.head_from_probe else "head"
    return "from_probe" if strategy.head_from_probe else "finetune"


def caches_features(strategy: FreezeStrategy, cache_features: bool | str, augmenting: bool) -> bool:
    """Whether the head trains on features computed once (`finetune.features`): only when the
    backbone stays frozen; with augmentation only when the head is the probe solved on the
    features of augmented views (`finetune.features.augmented_views`) or `cache_features` is
    true. `cache_features`: auto | true | false (checked with the config); raises
    `FinetuneError` for true with a strategy that trains the backbone."""
    if strategy.trains_backbone:
        if cache_features is True:
            raise FinetuneError(
                f"strategy.cache_features=true needs a frozen backbone, but strategy="
                f"{strategy.name} trains part of it. Fix: use strategy=last_layer, or drop "
                "cache_features."
            )
        return False
    if cache_features is True:
        if augmenting and not strategy.head_from_probe:
            log.warning(
                "strategy.cache_features=true: training images get the eval preprocessing "
                "(augmentation is off), so the backbone's features are computed once."
            )
        return True
    return cache_features == "auto" and (strategy.head_from_probe or not augmenting)
