"""The config schema (finetune.config): one type and one default per key, and a wrong key, option
or type refused before anything runs, with one message naming the key, its siblings and the
closest match."""

import dataclasses
import inspect
import json
import re
import shlex
import subprocess
import sys
import typing

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from conftest import CONF_DIR, FAST_OVERRIDES, REPO, run_train
from finetune.config import SCHEMAS, ConfigError, check_command_line, check_overrides
from finetune.config.schema import TrainerConfig

# (command line, what its one message must say)
REFUSED = [
    ("strategy.kk=3", ["`strategy.kk`", "cache_features", "Did you mean `k`?", "strategy=top_k"]),
    ("strategy=top_k strategy.kk=3", ["`strategy.kk`", "backbone_lr_scale", "Did you mean `k`?"]),
    ("+strategy.kk=3", ["`strategy.kk`", "cache_features", "cannot be added with `+`"]),
    ("trainer.max_epoch=2", ["`trainer.max_epoch`", "devices", "did you mean `max_epochs`?"]),
    ("data.augment=none", ["`data.augment`", "random_resized_crop", "`augment=none`"]),
    ("trainer.max_epochs=ten", ["`trainer.max_epochs`", "int", "`ten`"]),
    ("data.augment.crop_scale=[0.5,abc]", ["`data.augment.crop_scale`", "list of float", "=[0.5"]),
    # a value outside a key's fixed set, and a required key left without a value
    ("strategy=full strategy.bn=fro", ["`strategy.bn=fro`", "train_affine", "`frozen`?"]),
    ("trainer.precision=bogus", ["`trainer.precision=bogus`", "bf16-mixed", "16-mixed"]),
    ("data=imagefolder", ["`data.root` has no value", "data=imagefolder", "data.root="]),
]


@pytest.mark.parametrize(("line", "expected"), REFUSED, ids=[line for line, _ in REFUSED])
def test_train_py_refuses_a_wrong_key_or_type_before_the_run_dir_exists(tmp_path, line, expected):
    run_dir = tmp_path / "run"
    result = run_train(*shlex.split(line), f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output[-3000:]  # one message, one line
    for text in expected:
        assert text.lower() in errors[0].lower(), errors[0]
    assert not run_dir.exists()
    assert not (tmp_path / "outputs").exists()


def refusal(line: str) -> str:
    with pytest.raises(ConfigError) as caught:
        check_command_line(shlex.split(line))
    return str(caught.value)


def test_each_value_of_a_sweep_is_checked():
    message = refusal("-m seed=1,2 trainer.max_epochs=3,four")
    assert "`trainer.max_epochs`" in message and "`four`" in message
    # a key of one strategy only: refused for the other option of the sweep
    assert "strategy=full" in refusal("-m strategy=top_k,full strategy.k=3")
    check_command_line(shlex.split("-m strategy=top_k,gradual trainer.max_epochs=range(1,3)"))


def test_an_unknown_option_names_the_closest_one():
    message = refusal("strategy=topk")
    assert "Did you mean `strategy=top_k`?" in message
    assert "base_" not in message  # the schemas are not options a user chooses


def test_mixed_type_keys_accept_only_their_values():
    assert "auto, true, false" in refusal("strategy.cache_features=maybe")
    assert "normalise" in refusal("data.device_transforms=gpu")
    check_command_line(["strategy.cache_features=true", "speed.channels_last=false"])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("model.source=timmm", ["torchvision, timm, efficientnet_lite", "Did you mean `timm`?"]),
        ("data.augment.auto_augment=foo", ["trivialaugment, randaugment"]),
        ("data.dataset=flowers", ["hymenoptera, flowers102", "`flowers102`?"]),
        ("scheduler.name=cosin", ["cosine, step, constant", "`cosine`?"]),
        ("trainer.limit_train_batches=abc", ["any int, any float", "limit_train_batches=null"]),
        ("trainer.deterministic=maybe", ["null, true, false, warn"]),
        ("trainer.gradient_clip_algorithm=nrom", ["norm, value", "`norm`?"]),
        ("trainer.devices=true", ["any int, any list, any str"]),
        # counts below their minimum: refused at the command line, before any download
        ("strategy.augmented_views=-1", ["below its minimum 0", "augmented_views=auto"]),
        ("data.batch_size=0", ["`data.batch_size=0` is below its minimum 1", "batch_size=auto"]),
        ("data.eval_batch_size=0", ["below its minimum 1", "eval_batch_size=null"]),
        ("data.num_workers=-1", ["`data.num_workers=-1` is below its minimum 0", "num_workers=0"]),
        # Lightning's endless -1: the schedule has no length (a traceback in configure_optimizers)
        ("trainer.max_epochs=-1", ["`trainer.max_epochs=-1` is below its minimum 1", "=auto"]),
        # values out of range: refused before the run dir exists, not by torch mid-run
        ("data.augment.crop_scale=[1.0,0.2]", ["0 < lo <= hi <= 1", "crop_scale=[0.08,1.0]"]),
        ("data.augment.crop_scale=[0.0,1.0]", ["0 < lo <= hi <= 1"]),
        ("data.augment.crop_scale=[0.5]", ["must be [lo, hi]"]),
        ("data.augment.random_erasing=1.5", ["is above its maximum 1", "random_erasing=0"]),
        ("data.augment.color_jitter=-0.5", ["is below its minimum 0"]),
        ("data.train_fraction=0", ["`data.train_fraction=0.0` must be above 0", "=1.0"]),
        ("data.train_fraction=1.5", ["is above its maximum 1"]),
        ("data.val_fraction=1.5", ["must be below 1", "val_fraction=0.2"]),
        ("data.val_fraction=0", ["must be above 0"]),
        ("strategy=top_k strategy.k=-1", ["`strategy.k=-1` is below its minimum 0", "k=2"]),
    ],
)
def test_keys_with_fixed_values_refuse_another(line, expected):
    message = refusal(line)
    for text in expected:
        assert text in message, message


def test_the_fixed_values_are_those_the_code_uses():
    from lightning_fabric import connector

    from finetune.config import schema
    from finetune.data.layouts import LAYOUTS
    from finetune.sources import SOURCES

    assert set(schema.MODEL_SOURCES) == set(SOURCES)
    assert set(schema.DATASETS) == set(LAYOUTS)
    lightning = {None}
    for literal in ("_PRECISION_INPUT_INT", "_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS"):
        lightning |= set(typing.get_args(getattr(connector, literal)))
    assert set(schema.PRECISIONS) == lightning


def test_a_key_of_another_option_is_refused_with_that_option():
    message = refusal("data.synthetic.image_size=32")
    assert "`data.synthetic`" in message and "data=synthetic" in message
    assert "`optim.optimizer.momentum`" in refusal("optim=adamw optim.optimizer.momentum=0.9")


@pytest.mark.parametrize(
    "line",
    [
        "--cfg job",
        "model.min_loaded_fraction=0.9",
        "-m hparams_search=optuna strategy=full hydra.sweeper.n_trials=40",
        "-m experiment=sample_efficiency",
        "-m experiment=sample_efficiency_flowers102",
        "debug=overfit trainer=cpu",
        "data=imagefolder data.root=photos data.val_fraction=0.25",
        "+callbacks.timer._target_=pytorch_lightning.callbacks.Timer",  # free-form group
        "trainer.precision=bf16-mixed trainer.devices=2 trainer.limit_train_batches=0.5",
    ],
)
def test_valid_command_lines_pass(line):
    check_command_line(shlex.split(line))


def test_every_option_is_typed_by_its_schema():
    for group, schemas in SCHEMAS.items():
        types = set(schemas.values())
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            required = ["data.root=photos"] if path.stem in ("imagefolder", "csv") else []
            cfg = check_overrides([f"{group}={path.stem}", *required])
            assert OmegaConf.get_type(cfg[group]) in types, path


def test_strategy_keys_are_each_strategys_own():
    keys = {
        name.removeprefix("base_"): {f.name for f in dataclasses.fields(schema)}
        for name, schema in SCHEMAS["strategy"].items()
    }
    lr_and_bn = {"name", "backbone_lr_scale", "bn"}
    assert keys == {
        "last_layer": {"name", "cache_features", "head_init", "augmented_views"},
        "top_k": lr_and_bn | {"k"},
        "regex": lr_and_bn | {"train", "freeze"},
        "gradual": lr_and_bn | {"every_n_epochs", "on_plateau", "patience"},
        "full": lr_and_bn,
        "lp_ft": lr_and_bn,
        "scratch": {"name", "bn"},
    }


def test_trainer_keys_are_lightning_arguments_with_lightnings_defaults():
    parameters = inspect.signature(pl.Trainer.__init__).parameters
    for spec in dataclasses.fields(TrainerConfig):
        assert spec.name in parameters, spec.name
        assert spec.default == parameters[spec.name].default, spec.name


def test_one_default_for_decode_cache_and_min_loaded_fraction():
    cfg = check_overrides([])
    assert cfg.data.decode_cache_mb == 1024
    assert cfg.model.min_loaded_fraction == 0.5  # weights that do not load stop the run
    assert check_overrides(["model.min_loaded_fraction=0.9"]).model.min_loaded_fraction == 0.9


def test_data_root_comes_from_paths_and_the_environment(monkeypatch):
    monkeypatch.delenv("FINETUNE_DATA_ROOT", raising=False)
    assert check_overrides([]).data.root == "data"
    assert check_overrides(["paths.data_root=/datasets"]).data.root == "/datasets"
    monkeypatch.setenv("FINETUNE_DATA_ROOT", "/mnt/data")
    for dataset in ("hymenoptera", "flowers102", "synthetic"):
        assert check_overrides([f"data={dataset}"]).data.root == "/mnt/data"
    with pytest.raises(ConfigError, match=r"`data\.root` has no value"):
        check_overrides(["data=imagefolder"])  # the user's own folder has no default


def test_no_config_doc_or_benchmark_names_a_path_of_this_projects_machines():
    files = [*CONF_DIR.rglob("*.yaml"), *REPO.glob("benchmarks/**/*.*"), *REPO.glob("docs/*.md")]
    pattern = r"\.\./shared|parents\[2\] / \"shared\"|parent / \"shared\""
    named = [p for p in files if p.is_file() and re.search(pattern, p.read_text(errors="ignore"))]
    assert not named


def test_a_schema_key_cannot_be_deleted():
    assert "cannot be deleted" in refusal("~strategy.cache_features")


def test_a_key_of_another_strategy_names_that_strategy():
    message = refusal("strategy=full +strategy.cache_features=true")
    assert "`strategy.cache_features`" in message and "strategy=last_layer" in message


def test_a_key_a_sweeper_adds_is_refused_in_the_job(tmp_path):
    # the sweeper's values are not on the command line: the job itself checks its config
    extra = tmp_path / "conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "typo.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      +strategy.kk: 3\n"
    )
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        "experiment=typo",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        f"data.root={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]  # one failed job does not end a sweep
    failure = json.loads((sweep / "0" / "failure.json").read_text())
    assert "`strategy.kk`" in failure["error"] and "cache_features" in failure["error"]
    assert not (sweep / "0" / "metrics.json").exists()


def test_a_typo_is_refused_before_torch_loads():
    # the check runs before train.py imports the flow (torch, Lightning: seconds)
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', 'trainer.max_epoch=2']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as end:\n"
        "    print('exit', end.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.stdout.split() == ["exit", "1", "False"], result.stderr[-2000:]
    assert "max_epochs" in result.stderr


def test_a_key_typed_right_in_the_wrong_strategy_names_the_strategies_that_have_it():
    message = refusal("strategy.k=3")
    assert "`k` is a key of strategy=top_k, not of strategy=last_layer" in message
    assert "Did you mean" not in message


def test_the_config_files_point_at_schemas_and_files_that_exist():
    from finetune.config import schema

    for path in CONF_DIR.rglob("*.yaml"):
        text = path.read_text()
        for name in re.findall(r"finetune\.config\.(?:schema\.)?(\w+Config)\b", text):
            assert f"finetune.config.schema.{name}" in text and hasattr(schema, name), path
        for source in re.findall(r"src/finetune/[\w/]+\.py", text):
            assert (REPO / source).is_file(), (path, source)


def test_a_run_or_sweep_dir_that_cannot_be_made_is_refused_before_hydra_makes_it(tmp_path):
    a_file = tmp_path / "train.log"
    a_file.write_text("")
    message = refusal(f"hydra.run.dir={a_file}/run")
    assert f"{a_file} is a file, not a folder" in message and "hydra.run.dir=..." in message
    assert "no folder can be made in /proc" in refusal("hydra.run.dir=/proc/nope")
    assert "hydra.sweep.dir=..." in refusal(f"-m hydra.sweep.dir={a_file}/sweep seed=1,2")
    check_command_line([f"hydra.run.dir={tmp_path}/new/run"])  # creatable: accepted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.log"]  # and nothing made


def test_an_entry_of_another_callbacks_option_names_that_option():
    message = refusal("callbacks.early_stopping.patience=3")
    assert "`early_stopping` is an entry of callbacks=early_stopping" in message
    assert "Fix: add callbacks=early_stopping to the command line." in message
    assert "+callbacks" not in message  # not: add a new entry
    assert "+callbacks.my_cb=..." in refusal("callbacks.my_cb.x=3")  # a new entry: as before


@pytest.mark.parametrize(
    ("line", "regime"),
    [
        ("debug=overfit", "finetune"),  # was last_layer's probe: lr 0, the loss stayed flat
        ("debug=overfit strategy=lp_ft", "from_probe"),  # the command line still chooses
    ],
)
def test_debug_overfit_trains_by_the_optimizer(make_cfg, line, regime):
    """debug=overfit asks whether the model can fit one batch: its loss must be able to fall,
    so the optimizer must train (the default last_layer's head is the solved probe)."""
    from finetune import strategies

    assert strategies.plan(make_cfg(*shlex.split(line))).regime == regime
