"""Which parameters train: one Lightning callback per freeze strategy, each built from its schema
dataclass (`finetune.config.schema`); the base, `finetune.freezing.FreezeStrategy`, freezes.

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

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from finetune import optim
from finetune.backbones import Network
from finetune.config import check_fields
from finetune.config.messages import unknown_key
from finetune.config.strategy_schema import (
    BackboneTrainsConfig,
    FullConfig,
    GradualConfig,
    LastLayerConfig,
    LpFtConfig,
    RegexConfig,
    ScratchConfig,
    StrategyConfig,
    TopKConfig,
)
from finetune.config.values import AUTO
from finetune.errors import FinetuneError, unknown_name
from finetune.freezing import FreezeStrategy, top_blocks
from finetune.freezing import count_parameters as count_parameters  # the run's counts
from finetune.transforms import is_augmenting

log = logging.getLogger(__name__)


class LastLayer(FreezeStrategy):
    """Only the new head trains; the whole backbone, BatchNorm statistics included, is frozen."""

    config_class = LastLayerConfig
    config: LastLayerConfig
    trains_backbone = False
    # the head is the solved probe, or random as strategy.head_init=random says
    zero_head = False

    def __init__(self, config: LastLayerConfig | None = None) -> None:
        super().__init__(config)
        self.head_from_probe = self.config.head_init == "probe"

    @property
    def bn(self) -> str:
        return "frozen"  # the whole backbone, BatchNorm statistics included

    @property
    def backbone_lr_scale(self) -> float:
        return 1.0  # no backbone layer trains

    def trainable_names(self, network: Network) -> set[str]:
        return set()


class TopK(FreezeStrategy):
    """The head and the top `k` blocks of the backbone train."""

    config_class = TopKConfig
    config: TopKConfig

    def trainable_names(self, network: Network) -> set[str]:
        blocks = len(network.blocks())
        k = self.config.k
        if k > blocks:  # top_blocks would take them all: strategy=full under another name
            raise FinetuneError(
                f"strategy.k={k} asks for more blocks than the {blocks} that {network.name} "
                f"has below its head. Fix: strategy.k={blocks} or less (strategy.k={blocks} "
                "trains every block, as strategy=full does)."
            )
        return top_blocks(network, k)


class Regex(FreezeStrategy):
    """The head and the parameters whose names (as the network names them) match a `train`
    pattern and no `freeze` pattern (`re.search`)."""

    config_class = RegexConfig
    config: RegexConfig

    def trainable_names(self, network: Network) -> set[str]:
        def matches(patterns: list[str], name: str) -> bool:
            return any(re.search(pattern, name) for pattern in patterns)

        return {
            name
            for name, _ in network.net.named_parameters()
            if matches(self.config.train, name) and not matches(self.config.freeze, name)
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

    config_class = GradualConfig
    config: GradualConfig
    STATE = ("unfrozen", "best_val_acc", "epochs_without_improvement")

    def __init__(self, config: GradualConfig | None = None) -> None:
        super().__init__(config)
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
        every = self.config.every_n_epochs
        if self.config.on_plateau:
            due = self.epochs_without_improvement >= self.config.patience
        else:
            due = trainer.current_epoch > 0 and trainer.current_epoch % every == 0
        if due:
            self.unfreeze_next_block(trainer, pl_module)
            self.epochs_without_improvement = 0
        super().on_train_epoch_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.config.on_plateau:
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

    config_class: ClassVar[type[StrategyConfig]] = FullConfig
    config: BackboneTrainsConfig

    def trainable_names(self, network: Network) -> set[str]:
        return {name for name, _ in network.net.named_parameters()}


class LpFt(Full):
    """LP-FT (Kumar et al. 2022): the head is solved as a linear probe first, then every layer
    trains from it as `Full` does (the same rates: only the head's start differs)."""

    config_class = LpFtConfig
    head_from_probe = True


class Scratch(Full):
    """Every layer trains from random initialisation, all at the full rate: the baseline that
    shows what the pretrained weights are worth."""

    config_class = ScratchConfig
    pretrained = False

    @property
    def backbone_lr_scale(self) -> float:
        return 1.0  # random layers have no features to protect: all at the full rate


# The strategies by name. A new one is its schema dataclass (finetune.config.strategy_schema, in SCHEMAS,
# with an option file in conf/strategy) and a subclass here that names it as `config_class`,
# added to this tuple.
STRATEGIES: dict[str, type[FreezeStrategy]] = {
    cls.name: cls for cls in (LastLayer, TopK, Regex, Gradual, Full, LpFt, Scratch)
}


def build(strategy_cfg: Mapping[str, Any]) -> FreezeStrategy:
    """The strategy callback a `strategy` config names, built from its schema dataclass.
    Raises `UnknownNameError` for an unknown name and `ConfigError` for a key the strategy's
    schema lacks or a value it does not allow (the command line's check, for a config built in
    code)."""
    values = dict(strategy_cfg)
    name = values.get("name")
    if name not in STRATEGIES:
        raise unknown_name("strategy", str(name), list(STRATEGIES))
    cls = STRATEGIES[name]
    keys = [spec.name for spec in dataclasses.fields(cls.config_class)]
    for key in values:
        if key not in keys:
            raise unknown_key(f"strategy.{key}", keys, {"strategy": name})
    check_fields(values, cls.config_class, "strategy")
    return cls(cls.config_class(**values))


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
    return cache_features == AUTO and (strategy.head_from_probe or not augmenting)


class StrategyPlan(NamedTuple):
    """How a run trains, decided once from its config."""

    strategy: FreezeStrategy  # the callback that freezes and unfreezes
    caches_features: bool  # the head trains on features computed once (`caches_features`)
    regime: str  # one of `finetune.config.schema.REGIMES` (`training_regime`)


def plan(cfg: DictConfig) -> StrategyPlan:
    """The strategy of a composed config (`strategy`, with `data.augment`), whether its head
    trains on cached features and the regime the data-adaptive defaults read. Raises what
    `build` and `caches_features` raise."""
    strategy = build(OmegaConf.to_container(cfg.strategy, resolve=True))
    cached = caches_features(
        strategy,
        cfg.strategy.get("cache_features", "auto"),
        augmenting=is_augmenting(cfg.data.get("augment") or {}),
    )
    return StrategyPlan(strategy, cached, training_regime(strategy, cached))
