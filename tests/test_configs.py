"""Every option of every config group composes, and what it describes can be instantiated."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, make_class_folders
from finetune import adaptive, backbones, strategies
from finetune.callbacks import instantiate_all
from finetune.optim import build_optimizer
from finetune.run import build_datamodule


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_every_group_has_options():
    for group in (
        "model",
        "strategy",
        "data",
        "augment",
        "optim",
        "scheduler",
        "trainer",
        "callbacks",
        "logger",
        "debug",
        "experiment",
    ):
        assert options(group), group


@pytest.mark.parametrize("name", options("model"))
def test_model_options_build_with_a_new_head(make_cfg, name):
    cfg = make_cfg(f"model={name}", "model.weights=none")
    spec = backbones.input_spec(cfg.model)
    backbone = backbones.build(cfg.model, num_classes=3, pretrained=False)
    assert backbone.get_classifier().out_features == 3
    assert spec == backbone.input_spec


@pytest.mark.parametrize("name", options("data"))
def test_data_options_build_a_datamodule(make_cfg, tmp_path, name):
    cfg = make_cfg(f"data={name}", fast=False)
    if name in ("imagefolder", "csv"):
        make_class_folders(tmp_path / "photos", {"x": 3, "y": 3})
        cfg.data.root = str(tmp_path / "photos")
        rows = [
            f"{p.relative_to(tmp_path / 'photos')},{p.parent.name}"
            for p in sorted((tmp_path / "photos").rglob("*.jpg"))
        ]
        (tmp_path / "photos" / "labels.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    elif name == "synthetic":
        cfg.data.synthetic.image_size = 24
    dm = build_datamodule(cfg)
    assert dm.input_spec == backbones.input_spec(cfg.model)
    assert dm.dataset == cfg.data.dataset
    if name in ("imagefolder", "csv", "synthetic"):
        dm.prepare_data()  # lists the classes; reading them before is an error
        assert dm.num_classes >= 2


@pytest.mark.parametrize("name", options("augment"))
def test_augment_options_build_a_train_transform(make_cfg, name):
    from finetune.transforms import train_transform

    cfg = make_cfg(f"augment={name}")
    spec = backbones.input_spec(cfg.model)
    from PIL import Image

    image = train_transform(spec, cfg.data.augment)(Image.new("RGB", (300, 200)))
    assert image.shape == (3, spec.crop_size, spec.crop_size)


@pytest.mark.parametrize("name", options("strategy"))
def test_strategy_options_build(make_cfg, name):
    cfg = make_cfg(f"strategy={name}")
    assert strategies.build(OmegaConf.to_container(cfg.strategy, resolve=True)).name == name


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optim_and_scheduler_options_configure_the_optimizer(make_cfg, optim, scheduler):
    cfg = make_cfg(f"optim={optim}", f"scheduler={scheduler}")
    cfg, _ = adaptive.resolve(cfg, 20, 3, "finetune")  # lr=auto: as run.train passes it on
    backbone = backbones.build(cfg.model, 3, pretrained=False)
    optimizer, scheduler = build_optimizer(
        backbone, cfg.optim, cfg.scheduler, total_steps=20, steps_per_epoch=10
    )
    assert type(optimizer).__name__ == cfg.optim.optimizer._target_.rsplit(".", 1)[-1]
    assert optimizer.param_groups[0]["lr"] > 0
    for _ in range(20):
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_instantiate(make_cfg, name):
    cfg = make_cfg(f"trainer={name}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs a GPU to instantiate")
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options_instantiate(make_cfg, name):
    cfg = make_cfg(f"callbacks={name}")
    callbacks = instantiate_all(cfg.callbacks)
    assert all(isinstance(c, pl.Callback) for c in callbacks)
    assert any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(make_cfg, name):
    cfg = make_cfg(f"logger={name}")
    loggers = instantiate_all(cfg.logger)
    assert loggers and all(Path(lg.save_dir) == Path(cfg.run_dir) for lg in loggers)


@pytest.mark.parametrize("group", ["debug", "experiment"])
def test_debug_and_experiment_options_compose(make_cfg, group):
    for name in options(group):
        cfg = make_cfg(f"{group}={name}", fast=False)
        cfg, _ = adaptive.resolve(cfg, 244, 2, strategies.plan(cfg).regime)  # `auto` keys, as a run
        assert cfg.trainer.max_epochs >= 1
        instantiate(cfg.optim.optimizer)  # still a valid partial


def test_precision_and_devices_are_plain_keys(make_cfg):
    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.devices=2")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 2


def test_the_config_is_summed_up_at_the_start_and_printed_whole_on_request(
    make_cfg, tmp_path, caplog, capsys
):
    from finetune import rundir

    with caplog.at_level("INFO", logger="finetune.rundir"):
        rundir.save_config(make_cfg("strategy=full"), tmp_path)
    summary = caplog.text
    assert "Config: model=efficientnet_lite0 strategy=full data=synthetic" in summary
    assert f"The whole config: {tmp_path / 'config.yaml'}" in summary
    assert f"Run dir: {tmp_path}\nConfig: " in summary  # at the start, as at the end
    assert "min_loaded_fraction" not in summary + capsys.readouterr().out
    assert "min_loaded_fraction" in (tmp_path / "config.yaml").read_text()
    rundir.save_config(make_cfg("strategy=full", "print_config=true"), tmp_path)
    assert "min_loaded_fraction" in capsys.readouterr().out
