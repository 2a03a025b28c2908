"""Freezing: the base callback of every freeze strategy (`finetune.strategies`).

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
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytorch_lightning as pl
from torch import nn

from finetune import callbacks, lightning_internals
from finetune.backbones import Network
from finetune.config.schema import StrategyConfig

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
    parts in eval mode for the whole fit. A subclass names its schema dataclass
    (`config_class`, whose `name` is the strategy's name), is built from an instance of it
    (`self.config`), sets `pretrained` (whether the network starts from pretrained weights) and
    overrides `trainable_names`; `STATE` names the attributes saved in checkpoints."""

    name: ClassVar[str]
    config_class: ClassVar[type[StrategyConfig]]
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.config_class.name  # the schema's default names the option

    def __init__(self, config: StrategyConfig | None = None) -> None:
        # None: the schema's defaults. Values were checked with the config (`build` checks a
        # mapping built in code the same way).
        self.config = config if config is not None else self.config_class()
        self._eval_modules: list[nn.Module] = []
        # How the head was solved before fit (finetune.probe's report), kept in checkpoints so
        # that a resumed run reports it as the uninterrupted run does.
        self.probe_report: dict[str, Any] = {}
        # What the feature cache did for the run (metrics.json's feature_cache*), kept in
        # checkpoints for the same reason: a resume reads the file the first process wrote.
        self.feature_report: dict[str, Any] = {}

    @property
    def bn(self) -> str:
        """The BatchNorm policy of the trainable part, one of `finetune.config.values.BN_POLICIES`."""
        return self.config.bn

    @property
    def backbone_lr_scale(self) -> float:
        """The pretrained layers' learning rate as a fraction of the head's: the randomly
        initialised head's first, noisy gradients do not wreck the features beneath it."""
        return float(self.config.backbone_lr_scale)

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
        lightning_internals.run_validation_now(trainer)
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
