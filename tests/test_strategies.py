"""What each strategy trains, checked tensor by tensor after real optimizer steps."""

import pytest
import pytorch_lightning as pl
import torch

from finetune import backbones
from finetune.errors import FinetuneError
from finetune.run import train


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed_tensors(before: dict[str, torch.Tensor], network) -> set[str]:
    after = network.net.state_dict()
    return {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}


def run_and_capture(cfg, monkeypatch):
    """Train with `cfg`, returning the network's state before training and the trained network.
    Tensor names are the torch network's own (`network.net`), as `Network.blocks()` gives them."""
    captured = {}
    original_build = backbones.build

    def build_and_remember(*args, **kwargs):
        network = original_build(*args, **kwargs)
        captured["before"] = snapshot(network.net)
        captured["backbone"] = network
        return network

    monkeypatch.setattr(backbones, "build", build_and_remember)
    metrics = train(cfg)
    return captured["before"], captured["backbone"], metrics


# Two epochs of three steps: enough for every trainable tensor to move.
STEPS = ["trainer.max_epochs=2", "callbacks.model_checkpoint=null"]


def test_last_layer_changes_only_the_head_and_leaves_batchnorm_statistics_alone(
    make_cfg, monkeypatch
):
    cfg = make_cfg("strategy=last_layer", *STEPS)
    before, backbone, metrics = run_and_capture(cfg, monkeypatch)
    head = {name for name in before if name.startswith(f"{backbone.head_name}.")}
    assert head == {"classifier.weight", "classifier.bias"}
    assert changed_tensors(before, backbone) == head
    running_stats = [n for n in before if "running_" in n or "num_batches_tracked" in n]
    assert len(running_stats) > 100  # the check above covered the BatchNorm buffers
    assert metrics["trainable_params"] == backbone.get_classifier().weight.numel() + 3


def test_full_trains_every_layer_and_keeps_pretrained_batchnorm_statistics(make_cfg, monkeypatch):
    cfg = make_cfg("strategy=full", *STEPS)  # default bn policy: train_affine
    before, backbone, metrics = run_and_capture(cfg, monkeypatch)
    changed = changed_tensors(before, backbone)
    assert {"conv_stem.weight", "blocks.3.0.conv_dw.weight", "bn1.weight"} <= changed
    assert not {name for name in changed if "running_" in name}
    assert metrics["trainable_params"] == metrics["total_params"]


def test_bn_policy_train_updates_running_statistics(make_cfg, monkeypatch):
    cfg = make_cfg("strategy=full", "strategy.bn=train", *STEPS)
    before, backbone, _ = run_and_capture(cfg, monkeypatch)
    changed = changed_tensors(before, backbone)
    assert {"bn1.running_mean", "blocks.3.0.bn2.running_var", "bn1.weight"} <= changed


def test_bn_policy_frozen_keeps_batchnorm_affine_and_statistics(make_cfg, monkeypatch):
    cfg = make_cfg("strategy=full", "strategy.bn=frozen", *STEPS)
    before, backbone, metrics = run_and_capture(cfg, monkeypatch)
    changed = changed_tensors(before, backbone)
    assert "conv_stem.weight" in changed
    assert not {name for name in changed if ".bn" in name}
    assert metrics["trainable_params"] < metrics["total_params"]


def test_top_k_trains_the_head_and_exactly_the_top_k_blocks(make_cfg, monkeypatch):
    cfg = make_cfg("strategy=top_k", "strategy.k=2", *STEPS)
    before, backbone, metrics = run_and_capture(cfg, monkeypatch)
    changed = changed_tensors(before, backbone)
    learned = {name for name, p in backbone.net.named_parameters()}
    top_two = set(backbone.blocks()[-1]) | set(backbone.blocks()[-2])
    assert "conv_head.weight" in top_two and "blocks.5.0.conv_pw.weight" in top_two
    assert changed & learned == top_two | backbone.head_parameter_names()
    assert not {name for name in changed if "running_" in name}  # bn: train_affine
    expected = sum(p.numel() for n, p in backbone.net.named_parameters() if n in top_two) + 3843
    assert metrics["trainable_params"] == expected


def test_regex_trains_what_the_patterns_choose(make_cfg, monkeypatch, caplog):
    cfg = make_cfg(
        "strategy=regex", "strategy.train=[blocks\\.6\\.]", "strategy.freeze=[bn]", *STEPS
    )
    with caplog.at_level("INFO", logger="finetune.strategies"):
        before, backbone, _ = run_and_capture(cfg, monkeypatch)
    changed = changed_tensors(before, backbone)
    assert changed == {
        "blocks.6.0.conv_pw.weight",
        "blocks.6.0.conv_dw.weight",
        "blocks.6.0.conv_pwl.weight",
        "classifier.weight",
        "classifier.bias",
    }
    assert "blocks.6.0.conv_dw.weight" in caplog.text  # the trainable names are printed


def test_scratch_starts_from_random_weights_and_trains_everything(make_cfg, monkeypatch):
    cfg = make_cfg("strategy=scratch", *STEPS)
    before, backbone, metrics = run_and_capture(cfg, monkeypatch)
    pretrained = backbones.pretrained_network(cfg.model).state_dict()
    assert not torch.equal(before["conv_stem.weight"], pretrained["conv_stem.weight"])
    assert metrics["weights"] is None
    assert metrics["trainable_params"] == metrics["total_params"]
    assert "conv_stem.weight" in changed_tensors(before, backbone)


def test_optimizer_receives_only_trainable_parameters(make_cfg, monkeypatch):
    from finetune.module import ClassifierModule

    seen = {}
    original = ClassifierModule.configure_optimizers

    def spy(self):
        result = original(self)
        seen["optimizer"] = result["optimizer"]
        seen["trainable"] = {id(p) for p in self.parameters() if p.requires_grad}
        return result

    monkeypatch.setattr(ClassifierModule, "configure_optimizers", spy)
    train(
        make_cfg("strategy=last_layer", "trainer.max_epochs=1", "callbacks.model_checkpoint=null")
    )
    in_optimizer = {id(p) for group in seen["optimizer"].param_groups for p in group["params"]}
    assert in_optimizer == seen["trainable"]
    assert len(in_optimizer) == 2


def test_unknown_strategy_lists_the_choices():
    from finetune import strategies
    from finetune.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="last_layer"):
        strategies.build({"name": "half"})
    # a wrong strategy.bn is the config's to refuse (test_config_schema: strategy.bn=fro)


class KillAfterEpoch(pl.Callback):
    """Stands in for a kill: the fit dies at the end of `epoch`, before that epoch's checkpoint
    is written, so the last checkpoint is the previous epoch's."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


def gradual_state(checkpoint_path):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    strategy = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("FreezeStrategy"))
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    return {
        "unfrozen": strategy["unfrozen"],
        "groups": [
            (len(g["params"]), round(g["lr"], 12), round(g["initial_lr"], 12)) for g in groups
        ],
        "epoch": checkpoint["epoch"],
    }


GRADUAL = [
    "strategy=gradual",
    "trainer.max_epochs=4",
    "trainer.deterministic=true",
]


def test_gradual_unfreezes_one_block_per_epoch_with_its_own_param_groups(make_cfg, monkeypatch):
    cfg = make_cfg(*GRADUAL, "callbacks.model_checkpoint=null")  # evaluate the final weights
    before, backbone, metrics = run_and_capture(cfg, monkeypatch)
    state = gradual_state(f"{cfg.run_dir}/checkpoints/last.ckpt")
    assert state["unfrozen"] == 3  # unfrozen at the start of epochs 1, 2 and 3
    blocks = backbone.blocks()
    trainable = {n for n, p in backbone.net.named_parameters() if p.requires_grad}
    assert trainable == backbone.head_parameter_names() | set(blocks[-1]) | set(blocks[-2]) | set(
        blocks[-3]
    )
    assert len(state["groups"]) == 2 + 3 * 2  # head (weight, bias) + each block (decay, no decay)
    head_lr = state["groups"][0][1]
    assert all(lr == pytest.approx(0.1 * head_lr) for _, lr, _ in state["groups"][2:])
    changed = changed_tensors(before, backbone)
    assert "blocks.6.0.conv_pw.weight" in changed  # unfrozen at epoch 1
    assert "blocks.3.0.conv_pw.weight" not in changed  # never unfrozen
    assert changed <= trainable  # every other tensor, BatchNorm buffers included, is untouched
    assert metrics["trainable_params"] == sum(
        p.numel() for p in backbone.parameters() if p.requires_grad
    )


def test_gradual_resumed_after_a_kill_continues_the_same_schedule(make_cfg, monkeypatch, tmp_path):
    from finetune import callbacks

    whole = make_cfg(*GRADUAL)
    train(whole)
    uninterrupted = gradual_state(f"{whole.run_dir}/checkpoints/last.ckpt")

    killed = make_cfg(*GRADUAL)
    killed.run_dir = str(tmp_path / "killed")
    original = callbacks.instantiate_all
    monkeypatch.setattr(
        callbacks,
        "instantiate_all",
        lambda group: (
            [*original(group), KillAfterEpoch(2)]
            if group and "model_checkpoint" in group
            else original(group)
        ),
    )
    with pytest.raises(RuntimeError, match="killed"):
        train(killed)
    monkeypatch.setattr(callbacks, "instantiate_all", original)
    at_kill = gradual_state(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert at_kill["unfrozen"] == 1 and at_kill["epoch"] == 1

    resumed = make_cfg(*GRADUAL, f"ckpt_path={tmp_path / 'killed' / 'checkpoints' / 'last.ckpt'}")
    resumed.run_dir = str(tmp_path / "resumed")
    train(resumed)
    assert gradual_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == uninterrupted


def test_gradual_on_plateau_unfreezes_after_patience_epochs_without_improvement(monkeypatch):
    from types import SimpleNamespace

    from finetune.config.schema import GradualConfig
    from finetune.strategies import Gradual

    strategy = Gradual(GradualConfig(on_plateau=True, patience=2))
    unfrozen_at = []
    monkeypatch.setattr(
        strategy,
        "unfreeze_next_block",
        lambda trainer, module: unfrozen_at.append(trainer.current_epoch),
    )
    for epoch, val_acc in enumerate([0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7]):
        trainer = SimpleNamespace(current_epoch=epoch)
        strategy.on_train_epoch_start(trainer, None)
        metrics = {"val/acc": torch.tensor(val_acc)}
        strategy.on_validation_end(
            SimpleNamespace(sanity_checking=False, callback_metrics=metrics), None
        )
    # no gain at epochs 2 and 3 -> unfreeze at the start of epoch 4; 0.7 at epoch 4 is a new best,
    # then no gain at 5 and 6 -> the next unfreeze would come at epoch 7
    assert unfrozen_at == [4]
    assert strategy.state_dict()["epochs_without_improvement"] == 2


def test_a_strategy_is_built_from_its_schema_dataclass_with_its_defaults():
    from finetune import strategies
    from finetune.config import SCHEMAS

    for option, schema in SCHEMAS["strategy"].items():
        built = strategies.build({"name": schema.name})
        assert type(built.config) is schema and built.config == schema(), option
        assert built.name == schema.name and option == f"base_{built.name}"
    assert [n for n, c in strategies.STRATEGIES.items() if not c.pretrained] == ["scratch"]
    # what the run and the module read of each strategy, as the schema's defaults set it
    read = {
        name: (s.bn, s.backbone_lr_scale, s.head_from_probe)
        for name, s in ((n, strategies.build({"name": n})) for n in strategies.STRATEGIES)
    }
    assert read == {
        "last_layer": ("frozen", 1.0, True),
        "top_k": ("train_affine", 0.1, False),
        "regex": ("train_affine", 0.1, False),
        "gradual": ("train_affine", 0.1, False),
        "full": ("train_affine", 0.1, False),
        "lp_ft": ("train_affine", 0.1, True),
        "scratch": ("train", 1.0, False),
    }
    built = strategies.build({"name": "top_k", "k": 5, "bn": "frozen", "backbone_lr_scale": 0.5})
    assert (built.config.k, built.bn, built.backbone_lr_scale) == (5, "frozen", 0.5)
    assert not strategies.build({"name": "last_layer", "head_init": "random"}).head_from_probe


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "top_k", "kk": 3}, "Unknown config key `strategy.kk`. .* Did you mean `k`?"),
        ({"name": "full", "bn": "fro"}, "`strategy.bn=fro` is not one of: .* `frozen`?"),
        ({"name": "gradual", "patience": 0}, "`strategy.patience=0` is below its minimum 1"),
    ],
)
def test_a_strategy_built_in_code_is_checked_as_the_command_line_is(values, message):
    from finetune import strategies
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        strategies.build(values)


# The strategy callback's state as the code before strategies were built from their schema
# dataclasses wrote it into checkpoints (checkpoint["callbacks"]["FreezeStrategy"]).
EARLIER_STATES = {
    "gradual": {
        "unfrozen": 2,
        "best_val_acc": 0.75,
        "epochs_without_improvement": 1,
        "probe_report": {},
        "feature_report": {},
    },
    "lp_ft": {
        "probe_report": {"probe/l2": 0.001, "probe/val_acc": 0.9},
        "feature_report": {"feature_cache": "written"},
    },
}


@pytest.mark.parametrize("name", sorted(EARLIER_STATES))
def test_a_checkpoints_strategy_state_written_before_loads(name):
    from finetune import strategies

    strategy = strategies.build({"name": name})
    assert strategy.state_key == "FreezeStrategy"
    strategy.load_state_dict(EARLIER_STATES[name])
    assert strategy.state_dict() == EARLIER_STATES[name]
    fresh = strategies.build({"name": name}).state_dict()
    assert fresh.keys() == EARLIER_STATES[name].keys()  # and it writes the same keys


@pytest.mark.parametrize(
    ("name", "head_init", "cache_features", "augmenting", "expected"),
    [
        ("last_layer", "probe", "auto", False, True),
        ("last_layer", "probe", "auto", True, True),  # the probe on clean + augmented views
        ("last_layer", "random", "auto", True, False),  # SGD on augmented images
        ("last_layer", "random", "auto", False, True),
        ("last_layer", "random", True, True, True),
        ("last_layer", "probe", False, False, False),
        ("full", None, "auto", False, False),
        ("top_k", None, "auto", False, False),
    ],
)
def test_the_run_caches_features_only_for_a_frozen_backbone(
    name, head_init, cache_features, augmenting, expected
):
    from finetune import strategies

    strategy = strategies.build({"name": name} | ({"head_init": head_init} if head_init else {}))
    assert strategies.caches_features(strategy, cache_features, augmenting) is expected


def test_cache_features_true_needs_a_frozen_backbone():
    # its values (auto, true, false) are the schema's: test_config_schema checks them
    from finetune import strategies
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="strategy=last_layer"):
        strategies.caches_features(strategies.build({"name": "full"}), True, False)


def test_top_k_refuses_more_blocks_than_the_network_has(make_cfg):
    with pytest.raises(FinetuneError, match=r"strategy.k=100 asks for more blocks than the 8 "):
        train(make_cfg("strategy=top_k", "strategy.k=100"))


@pytest.mark.parametrize(
    ("overrides", "zero"),
    [
        (["strategy=full"], True),
        (["strategy=top_k"], True),
        (["strategy=scratch"], True),
        (["strategy=last_layer", "strategy.head_init=random", "strategy.augmented_views=0"], False),
    ],
)
def test_a_head_the_optimizer_trains_from_the_start_starts_at_zero(
    make_cfg, tmp_path, overrides, zero
):
    # BiT's zero head: the first steps send no random gradients into the pretrained features;
    # head_init=random keeps nn.Linear's random draw, as its name says
    from finetune import run

    cfg = make_cfg(*overrides, "model=resnet18", "model.weights=none")
    head = run.build_model(cfg, run.build_data(cfg, tmp_path / "run")).network.get_classifier()
    starts_at_zero = int(head.weight.count_nonzero()) + int(head.bias.count_nonzero()) == 0
    assert starts_at_zero is zero
