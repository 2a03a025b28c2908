"""Data-adaptive defaults (finetune.adaptive): each rule at its edges, a user's value kept, `auto`
refusing junk, the block a real run logs, and a resume that resolves the same values."""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

import pytest

from conftest import (
    FAST_OVERRIDES,
    data_module,
    folder_overrides,
    hparams_plugin_data,
    make_class_folders,
    run_train,
)
from finetune import adaptive, distributed, strategies
from finetune.backbones import InputSpec
from finetune.config import ConfigError, check_command_line
from finetune.data import FinetuneDataModule
from finetune.errors import FinetuneError

SPEC = InputSpec(
    crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear"
)


@pytest.fixture
def auto_cfg(make_cfg):
    """The real default config (every adaptive key at `auto`) with `overrides`."""

    def _make(*overrides: str):
        return make_cfg(*overrides, fast=False)

    return _make


@pytest.mark.parametrize(
    ("train_images", "expected"),
    [(5000, 32), (128, 32), (127, 16), (64, 16), (63, 8), (20, 8), (1, 8)],
)
def test_batch_size_halves_while_the_split_gives_fewer_than_four_batches(train_images, expected):
    assert adaptive.auto_batch_size(train_images).value == expected


@pytest.mark.parametrize(
    ("regime", "train_images", "num_classes", "expected"),
    [
        ("head", 244, 2, 5),  # 122 images per class: 1 epoch would do, lo = 5
        ("head", 1020, 102, 10),  # 10 per class: ceil(100 / 10), in between
        ("head", 510, 102, 15),  # 5 per class: 20 wanted, hi = 15
        ("finetune", 244, 2, 10),  # ceil(200 / 122) = 2, lo = 10
        ("finetune", 1020, 102, 20),  # ceil(200 / 10), in between
        ("from_probe", 1020, 102, 20),
        ("finetune", 204, 102, 30),  # 2 per class: 100 wanted, hi = 30
        ("probe", 1020, 102, 1),  # the solve is the training
        ("probe", 8, 2, 1),
    ],
)
def test_max_epochs_presents_each_class_p_times_within_the_regimes_range(
    regime, train_images, num_classes, expected
):
    assert adaptive.auto_max_epochs(regime, train_images, num_classes).value == expected


@pytest.mark.parametrize(
    ("regime", "augmenting", "train_images", "num_classes", "expected"),
    [
        ("probe", True, 244, 2, 5),  # 122 images per class: 1 view would do, lo = 5
        ("probe", True, 1020, 102, 10),  # 10 per class: ceil(100 / 10)
        ("probe", True, 510, 102, 15),  # 5 per class: 20 wanted, hi = 15
        ("probe", False, 1020, 102, 0),  # un-augmented views are the clean image again
        ("head", True, 1020, 102, 0),  # the head trains by the optimizer: no probe to widen
        # the full-batch solve stays within MAX_PROBE_ROWS = 50k rows of clean + views
        ("probe", True, 10_000, 10, 4),  # 1000 per class: 5 wanted, 50k / 10k - 1 = 4
        ("probe", True, 20_000, 1000, 1),  # 20 per class: 5 wanted, 50k / 20k - 1 = 1
        ("probe", True, 30_000, 10, 0),  # too large for a single view
    ],
)
def test_augmented_views_present_each_class_p_times_with_augmentation_only(
    regime, augmenting, train_images, num_classes, expected
):
    choice = adaptive.auto_views(regime, augmenting, train_images, num_classes)
    assert choice.value == expected


@pytest.mark.parametrize(
    ("views", "regime", "augmenting", "message"),
    [
        (-1, "probe", True, "`strategy.augmented_views=-1` is below its minimum 0"),
        (3, "head", True, "applies to the solved linear probe"),
        (3, "probe", False, "without augmentation: every view would be the clean image"),
    ],
)
def test_augmented_views_that_cannot_apply_are_refused(
    auto_cfg, views, regime, augmenting, message
):
    cfg = auto_cfg(f"strategy.augmented_views={views}")
    with pytest.raises(FinetuneError, match=message) as caught:
        adaptive.resolve(cfg, 100, 2, regime, augmenting=augmenting)
    assert "Fix:" in str(caught.value)
    adaptive.resolve(auto_cfg("strategy.augmented_views=0"), 100, 2, regime, augmenting=augmenting)


def test_no_views_with_augmentation_is_warned_about(auto_cfg, caplog):
    with caplog.at_level("WARNING", logger="finetune.adaptive"):
        adaptive.resolve(auto_cfg("strategy.augmented_views=0"), 100, 2, "probe", augmenting=True)
    assert "data.augment has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune.adaptive"):
        adaptive.resolve(auto_cfg("strategy.augmented_views=0"), 100, 2, "probe")
    assert not caplog.records  # nothing augmented, nothing lost


@pytest.mark.parametrize(
    ("optim", "regime", "batch_size", "expected"),
    [
        ("sgd", "finetune", 32, 0.01),
        ("sgd", "finetune", 8, 0.0025),
        ("sgd", "head", 16, 0.005),
        ("sgd", "from_probe", 32, 0.01),
        ("sgd", "from_probe", 8, 0.0025),
        ("adamw", "finetune", 32, 0.001),
        ("adamw", "head", 64, 0.002),
    ],
)
def test_lr_scales_linearly_with_the_batch_size(auto_cfg, optim, regime, batch_size, expected):
    cfg = auto_cfg(f"optim={optim}", f"data.batch_size={batch_size}")
    resolved, chosen = adaptive.resolve(cfg, 1000, 10, regime)
    assert resolved.optim.optimizer.lr == pytest.approx(expected)
    assert "data.batch_size" not in chosen  # the batch size was set
    assert "linear scaling" in chosen["optim.optimizer.lr"]["rule"]


@pytest.mark.parametrize(
    ("overrides", "train_images", "batch", "lr"),
    [
        ([], 244, 32, 0.01),
        # 2 x 32 would give 3.8 optimizer steps of 244 images: 16 per process, the plain run's 32
        (["trainer.devices=2"], 244, 16, 0.01),
        (["trainer.devices=2"], 5000, 32, 0.02),  # 64 images a step: twice the rate
        (["trainer.devices=2", "trainer.num_nodes=2"], 5000, 32, 0.04),
        (["trainer.devices='0,1,2'"], 5000, 32, 0.03),  # a string of device ids
        (["trainer.accumulate_grad_batches=4"], 5000, 32, 0.04),  # 4 batches a step
        (["trainer.accumulate_grad_batches=2"], 244, 16, 0.01),
    ],
)
def test_the_rules_count_the_images_of_one_optimizer_step(
    auto_cfg, overrides, train_images, batch, lr
):
    cfg = auto_cfg("strategy=full", *overrides)
    per_step = distributed.world_size(cfg.trainer) * cfg.trainer.accumulate_grad_batches
    resolved, chosen = adaptive.resolve(cfg, train_images, 2, "finetune", batches_per_step=per_step)
    assert (resolved.data.batch_size, resolved.optim.optimizer.lr) == (batch, pytest.approx(lr))
    if per_step > 1 and batch == 32:
        assert (
            f"x {per_step} (processes x gradient accumulation)"
            in chosen["optim.optimizer.lr"]["rule"]
        )


def test_a_launchers_world_size_wins_over_the_config(auto_cfg, monkeypatch):
    cfg = auto_cfg("trainer.devices=1")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's, or Lightning's for its own ranks
    assert distributed.world_size(cfg.trainer) == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.world_size(cfg.trainer) == 1


def test_the_loaders_take_the_resolved_batch_and_other_process_counts_are_refused(
    make_cfg, monkeypatch
):
    """99 training images, 2 batches a step: the rules choose 8 per batch (the data module's
    one-step rule alone would take 16) at lr 0.005. A resume on 8 processes would take 16 x 8
    images a step at 0.04: refused, as is a run whose trainer runs another number of processes
    than the rules counted."""
    from finetune import run
    from finetune.resume import ResumeRefused

    options = ["strategy=full", "augment=none", "data.synthetic.train_per_class=33"]
    cfg = make_cfg(*options, "data.batch_size=auto", "trainer.accumulate_grad_batches=2")
    seen = []
    train_dataloader = FinetuneDataModule.train_dataloader

    def recording(datamodule):
        loader = train_dataloader(datamodule)
        seen.append(loader.batch_size)
        return loader

    monkeypatch.setattr(FinetuneDataModule, "train_dataloader", recording)
    metrics = run.train(cfg)
    assert seen == [metrics["adaptive"]["data.batch_size"]] == [8]
    assert metrics["adaptive"]["optim.optimizer.lr"] == 0.005
    assert adaptive.auto_batch_size(99).value == 16  # what the loaders took before

    monkeypatch.setattr(distributed, "world_size", lambda trainer_cfg: 8)
    resumed = make_cfg(
        *options,
        "data.batch_size=auto",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_epochs=2",
        "ckpt_path=last",
    )
    with pytest.raises(ResumeRefused, match=r"lr=0.04: the run trained at 0.005") as caught:
        run.train(resumed)
    assert "Fix: resume with the run's devices, or add optim.optimizer.lr=0.005" in str(
        caught.value
    )
    cfg = make_cfg(*options, "data.batch_size=auto")  # a new run: 8 processes counted, 1 runs
    cfg.run_dir = str(Path(cfg.run_dir).parent / "other")
    with pytest.raises(FinetuneError, match="The trainer runs 1 processes, but") as caught:
        run.train(cfg)
    assert "data.batch_size" in str(caught.value) and "Fix:" in str(caught.value)


def test_resolve_fills_every_auto_key_from_the_data_and_leaves_cfg_as_it_was(auto_cfg):
    cfg = auto_cfg("data=flowers102", "strategy=full")
    resolved, chosen = adaptive.resolve(cfg, 1020, 102, "finetune")
    assert {key: choice["value"] for key, choice in chosen.items()} == {
        "data.batch_size": 32,
        "trainer.max_epochs": 20,
        "optim.optimizer.lr": 0.01,
    }
    assert (resolved.data.batch_size, resolved.trainer.max_epochs) == (32, 20)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.optim.optimizer.lr) == ("auto",) * 3
    assert adaptive.metrics_entry(chosen) == {
        "adaptive": {"data.batch_size": 32, "trainer.max_epochs": 20, "optim.optimizer.lr": 0.01}
    }


def test_a_value_the_user_set_is_kept(auto_cfg):
    cfg = auto_cfg(
        "data.batch_size=12",
        "trainer.max_epochs=3",
        "optim.optimizer.lr=0.05",
        "strategy.augmented_views=4",
    )
    resolved, chosen = adaptive.resolve(cfg, 20, 2, "probe", augmenting=True)
    assert chosen == {}
    assert resolved.strategy.augmented_views == 4
    assert (resolved.data.batch_size, resolved.trainer.max_epochs) == (12, 3)
    assert resolved.optim.optimizer.lr == 0.05
    # trainer.max_epochs=null (no limit) is a value too; max_steps sets the length in steps
    resolved, chosen = adaptive.resolve(auto_cfg("trainer.max_epochs=null"), 20, 2, "head")
    assert resolved.trainer.max_epochs is None and "trainer.max_epochs" not in chosen
    resolved, chosen = adaptive.resolve(auto_cfg("trainer.max_steps=300"), 20, 2, "head")
    assert resolved.trainer.max_epochs is None
    assert "max_steps=300" in chosen["trainer.max_epochs"]["rule"]


def test_resolve_logs_one_line_per_chosen_key_and_per_key_kept_as_given(auto_cfg, caplog):
    """The fresh-user case: a key set on the command line vanished from the printed rules, so
    nothing said whether the rule or the user had chosen it."""
    with caplog.at_level("INFO", logger="finetune.adaptive"):
        adaptive.resolve(
            auto_cfg("trainer.max_epochs=4", "strategy.augmented_views=0"), 244, 2, "head"
        )
    [record] = caplog.records
    lines = record.getMessage().splitlines()
    assert "244 training images of 2 classes" in lines[0]
    assert lines[1:] == [
        "  data.batch_size = 32 (32, halved while 244 training images give fewer than 4 "
        "optimizer steps, at least 8)",
        "  optim.optimizer.lr = 0.01 (SGD base 0.01 (head) x batch 32 / 32, linear scaling "
        "(Goyal et al. 2017))",
        "  trainer.max_epochs = 4 (set, kept as given)",
        "  strategy.augmented_views = 0 (set, kept as given)",
    ]
    caplog.clear()
    all_set = auto_cfg(
        "data.batch_size=8",
        "trainer.max_epochs=4",
        "optim.optimizer.lr=1",
        "strategy.augmented_views=0",
    )
    with caplog.at_level("INFO", logger="finetune.adaptive"):
        adaptive.resolve(all_set, 8, 2, "head")
    assert not caplog.records  # nothing chosen, nothing logged


def test_an_unknown_regime_or_optimizer_is_refused(auto_cfg):
    with pytest.raises(FinetuneError, match="regime 'linear'"):
        adaptive.resolve(auto_cfg(), 10, 2, "linear")
    cfg = auto_cfg("optim.optimizer._target_=torch.optim.RMSprop")
    with pytest.raises(FinetuneError, match=r"no rule for the optimizer torch\.optim\.RMSprop"):
        adaptive.resolve(cfg, 10, 2, "finetune")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "probe"),  # default augmentation: the probe on clean and augmented views
        (["augment=none"], "probe"),
        (["strategy.cache_features=true"], "probe"),
        (["strategy.cache_features=false"], "head"),  # SGD on images from the probe
        (["strategy.head_init=random"], "head"),
        (["augment=none", "strategy.cache_features=false"], "head"),
        (["strategy=full"], "finetune"),
        (["strategy=scratch"], "finetune"),
        (["strategy=lp_ft"], "from_probe"),
        (["augment=none", "strategy.head_init=random"], "head"),  # SGD on cached features
    ],
)
def test_regime_of_a_config(auto_cfg, overrides, expected):
    assert strategies.plan(auto_cfg(*overrides)).regime == expected


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("data.batch_size=big", "data.batch_size"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("trainer.max_epochs=many", "trainer.max_epochs"),
        ("optim.optimizer.lr=fast", "optim.optimizer.lr"),
        ("optim=adamw optim.optimizer.lr=true", "optim.optimizer.lr"),
    ],
)
def test_auto_keys_refuse_junk(line, key):
    with pytest.raises(ConfigError) as caught:
        check_command_line(shlex.split(line))
    assert f"`{key}` takes auto" in str(caught.value)
    assert f"Fix: e.g. {key}=auto" in str(caught.value)


def test_the_data_module_takes_its_batch_size_from_the_rules_not_its_own(tmp_path):
    make_class_folders(tmp_path / "train", {"a": 30, "b": 30})  # 60 images: 32 -> 16 -> 8
    make_class_folders(tmp_path / "val", {"a": 2, "b": 2}, seed=1)
    options = {"num_workers": 0, "decode_cache_mb": 0}
    module = data_module("imagefolder", tmp_path, SPEC, eval_batch_size=None, **options)
    module.prepare_data()
    module.setup("fit")
    assert module.batch_size == module.eval_batch_size == "auto"  # listing chooses nothing
    with pytest.raises(FinetuneError, match=r"data.batch_size=auto .* Fix: set the data module"):
        module.train_dataloader()
    module.batch_size = adaptive.auto_batch_size(module.splits.sizes()["train"]).value
    assert (module.train_dataloader().batch_size, module.val_dataloader().batch_size) == (8, 8)


def auto_run(root: Path, run_dir: Path, *overrides: str):
    """train.py on a tiny image folder with data.batch_size and trainer.max_epochs at `auto`."""
    kept = [
        o
        for o in folder_overrides(root)
        if not o.startswith(("data.batch_size=", "trainer.max_epochs="))
    ]
    assert kept != folder_overrides(root) and "trainer.max_epochs=1" in FAST_OVERRIDES
    return run_train(*kept, "augment=none", *overrides, f"hydra.run.dir={run_dir}")


def chosen_lines(output: str) -> dict[str, str]:
    """The keys the rules chose, from the printed block (not those the user set and kept)."""
    pattern = r"^\s+((?:data|trainer|optim)\.[\w.]+) = (\S+) \((?!set, kept as given)"
    return dict(re.findall(pattern, output, re.M))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adaptive_photos")
    make_class_folders(root, {"ants": 10, "bees": 10})  # 16 train, 4 val (val_fraction 0.2)
    return root


def test_a_run_logs_the_values_it_chose_and_sends_them_to_the_loggers(photos, tmp_path):
    run_dir = tmp_path / "run"
    result = auto_run(photos, run_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Data-adaptive defaults for 16 training images of 2 classes (regime probe" in output
    assert chosen_lines(output) == {
        "data.batch_size": "8",
        "trainer.max_epochs": "1",
        "optim.optimizer.lr": "0.0025",
    }
    hparams = hparams_plugin_data(run_dir / "tensorboard")["hparams"]
    assert hparams["data.batch_size"] == 8 and hparams["trainer.max_epochs"] == 1
    assert hparams["optim.optimizer.lr"] == pytest.approx(0.0025)
    assert "max_epochs: auto" in (run_dir / "config.yaml").read_text()  # resolved again on resume


@pytest.mark.slow  # three train.py processes: CI's slow step
def test_a_resume_of_an_auto_run_resolves_the_same_values(photos, tmp_path):
    run_dir = tmp_path / "run"
    first = auto_run(photos, run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    # the run's 1 epoch is resolved again from the same data: nothing left to train
    again = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last")
    assert again.returncode == 1, again.stderr[-3000:]
    # (the run is the solved probe: the refusal offers another strategy, not more epochs)
    assert "Nothing to resume" in again.stdout and "strategy=lp_ft" in again.stdout
    longer = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2")
    output = longer.stdout + longer.stderr
    assert longer.returncode == 0, output[-3000:]
    assert chosen_lines(output) == {"data.batch_size": "8", "optim.optimizer.lr": "0.0025"}
    assert "  trainer.max_epochs = 2 (set, kept as given)" in output
    assert "trainer.max_epochs changed from 'auto' to 2" in output
    assert "data.batch_size changed" not in output


@pytest.mark.slow  # three train.py processes: CI's slow step
def test_a_resume_of_a_run_made_with_older_defaults_names_the_values_to_pin(photos, tmp_path):
    run_dir = tmp_path / "run"
    assert auto_run(photos, run_dir).returncode == 0
    # A run made before the lr default became `auto` saved a number there.
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("lr: auto", "lr: 0.0025"))
    refused = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2")
    assert refused.returncode == 1
    assert "add optim.optimizer.lr=0.0025 to the command" in refused.stdout + refused.stderr
    pinned = run_train(
        f"hydra.run.dir={run_dir}",
        "ckpt_path=last",
        "trainer.max_epochs=2",
        "optim.optimizer.lr=0.0025",
    )
    assert pinned.returncode == 0, (pinned.stdout + pinned.stderr)[-3000:]


def test_more_epochs_for_the_solved_probe_are_warned_about(auto_cfg, caplog):
    cfg = auto_cfg("augment=none", "trainer.max_epochs=2")
    assert strategies.plan(cfg).regime == "probe"  # the default strategy, on cached features
    with caplog.at_level(logging.WARNING, logger="finetune.adaptive"):
        adaptive.resolve(cfg, 16, 2, strategies.plan(cfg).regime)
    assert "trainer.max_epochs=2 with the solved linear probe" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.adaptive"):
        adaptive.resolve(auto_cfg("augment=none"), 16, 2, "probe")  # auto: 1 epoch
    assert "with the solved linear probe" not in caplog.text


def test_the_printed_rules_say_when_a_count_was_clamped_and_when_the_lr_is_unused():
    """Hymenoptera's 122 images per class want 2 epochs, and the run trains 10: the rule
    said "= 2, within [10, 30]"; the probe's lr (its epoch steps at 0) read as if it trained."""
    clamped = adaptive.auto_max_epochs("finetune", 244, 2).rule
    assert "= 2, clamped to [10, 30]" in clamped
    assert "= 20, within [10, 30]" in adaptive.auto_max_epochs("finetune", 1020, 102).rule
    assert "= 1, clamped to [5, 15]" in adaptive.auto_views("probe", True, 244, 2).rule
    probe = adaptive.auto_lr("torch.optim.SGD", "probe", 32).rule
    assert "unused" in probe and "learning rate 0" in probe
    assert "unused" not in adaptive.auto_lr("torch.optim.SGD", "head", 32).rule
