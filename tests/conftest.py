"""Shared fixtures: the real Hydra config with fast CPU overrides, and small image folders in the
real on-disk formats."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

import finetune.config  # noqa: F401  registers the schema that conf/ extends

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"

# Small enough for a 2-core CPU, big enough for BatchNorm and a 3-class split.
FAST_OVERRIDES = [
    "data=synthetic",
    "data.synthetic.train_per_class=4",
    "data.synthetic.val_per_class=2",
    "data.synthetic.test_per_class=2",
    "data.synthetic.image_size=32",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "model=efficientnet_lite0",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "print_config=false",
]


# A randomly initialised network of timm's test family (0.4 M parameters, 160 px input, built
# offline in a second): for tests of the training flow whose outcome does not depend on
# pretrained weights, at a fraction of efficientnet_lite0's cost.
TINY_MODEL = ["model=timm", "model.name=test_efficientnet", "model.weights=none"]


def folder_overrides(root: Path) -> list[str]:
    """FAST_OVERRIDES for an image folder at `root` in place of the synthetic set."""
    kept = [o for o in FAST_OVERRIDES if not o.startswith(("data=", "data.synthetic"))]
    return ["data=imagefolder", f"data.root={root}", *kept]


def compose_config(overrides: list[str], run_dir: Path, data_root: Path) -> DictConfig:
    """The real `conf/config.yaml` composed with `overrides`, writing under `run_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.paths.data_root = str(data_root)
        if OmegaConf.is_missing(cfg.data, "root"):  # data=imagefolder names no default
            cfg.data.root = str(data_root)
    return cfg


def data_module(dataset: str, root: Path, input_spec, **options):
    """A `FinetuneDataModule` for `dataset` at `root` with the config's data defaults (composed
    as train.py does, seed 0) and `options` over them: the config is the one default."""
    from finetune.data import FinetuneDataModule

    cfg = compose_config([f"data={dataset}", "seed=0"], Path(root), Path(root))
    defaults = OmegaConf.to_container(cfg.data, resolve=True)
    return FinetuneDataModule(input_spec=input_spec, **{**defaults, "root": str(root), **options})


@pytest.fixture(scope="session", autouse=True)
def project_cache_dir(tmp_path_factory) -> Path:
    """The project's cache folder ($FINETUNE_CACHE_DIR, also for train.py subprocesses) under the
    session's tmp dir: no test writes into ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root shared by the session, so the synthetic set is generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path, data_root) -> Callable[..., DictConfig]:
    def _make(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_config(
            [*(FAST_OVERRIDES if fast else []), *overrides], tmp_path / "run", data_root
        )

    return _make


def write_image(
    path: Path, colour: tuple[int, int, int], size: int = 24, fmt: str = "JPEG"
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)


def make_class_folders(
    folder: Path, counts: dict[str, int], seed: int = 0, extension: str = ".jpg"
) -> None:
    """`folder/<class>/<n>.jpg` with `counts[class]` small images each."""
    rng = random.Random(seed)
    for class_name, count in counts.items():
        for index in range(count):
            colour = tuple(rng.randrange(256) for _ in range(3))
            write_image(folder / class_name / f"{class_name}_{index}{extension}", colour)


@pytest.fixture
def flowers_root(tmp_path) -> Path:
    """torchvision's Flowers102 layout: the real .mat files plus generated tiny JPEGs."""
    source = SHARED_DATA / "flowers-102"
    if not source.is_dir():
        pytest.skip("../shared/data/flowers-102 is not present")
    folder = tmp_path / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    for name in ("imagelabels.mat", "setid.mat"):
        (folder / name).write_bytes((source / name).read_bytes())
    tiny = Image.new("RGB", (8, 8), (200, 40, 90))
    for image_id in range(1, 8190):
        tiny.save(folder / "jpg" / f"image_{image_id:05d}.jpg")
    return tmp_path


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty $TORCH_HOME, so torchvision finds no cached weights."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_train(
    *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- fault tally (tests/test_faults.py) -----------------------------------------------------------

FAULT_TALLY = {"faults injected": 0, "handled clearly": 0, "checkpoints lost": 0}


@pytest.fixture
def record_fault() -> Callable[..., None]:
    """`record_fault(handled, lost=0, shown="")`: count one injected fault, whether it was handled
    with a clear message and how many finished checkpoints it lost (printed at the session's
    end), then fail the test unless it was handled and lost none: the tally is a report, never
    the only check. `shown` (the message the user saw) goes into the failure."""

    def record(handled: bool, lost: int = 0, shown: str = "") -> None:
        FAULT_TALLY["faults injected"] += 1
        FAULT_TALLY["handled clearly"] += int(handled)
        FAULT_TALLY["checkpoints lost"] += lost
        assert handled, f"the fault was not handled clearly; the user saw: {shown[-2000:]!r}"
        assert lost == 0, f"{lost} finished checkpoint(s) lost"

    return record


def pytest_sessionfinish(session) -> None:
    """Under pytest-xdist, each worker hands its share of the tally to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_tally"] = json.dumps(FAULT_TALLY)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    markexpr = config.option.markexpr or ""
    if "slow" in markexpr.replace("not slow", ""):
        # `-m slow` runs in one process: its tests start several processes each and kill them
        # on timers, which two workers sharing the cores would make miss.
        config.option.numprocesses, config.option.dist = 0, "no"
    if hasattr(config, "workerinput"):
        # Two test workers share the 2 cores: one OpenMP thread each (also for the train.py
        # subprocesses they start), or the workers' thread pools thrash.
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    elif config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_WorkerTally())


class _WorkerTally:
    """The controller's side: sums the tallies the workers send."""

    def pytest_testnodedown(self, node, error) -> None:
        for key, count in json.loads(node.workeroutput.get("fault_tally", "{}")).items():
            FAULT_TALLY[key] += count


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault-injection tally, when fault tests ran (`checkpoints lost` must be 0)."""
    if FAULT_TALLY["faults injected"]:
        terminalreporter.write_sep("=", "fault tally")
        terminalreporter.write_line(json.dumps(FAULT_TALLY))


# --- nothing written into the repository ----------------------------------------------------------

# Where a run without hydra.run.dir / hydra.sweep.dir / data.root would write, relative to REPO.
RUN_OUTPUT_DIRS = ("outputs", "multirun", "lightning_logs", "data")


def repository_outputs() -> dict[str, int]:
    """Modification times of RUN_OUTPUT_DIRS and their entries two levels deep: a new run dir
    (outputs/runs/<run>, outputs/multirun/<time>) or a file written into one changes them."""
    seen = {}
    for name in RUN_OUTPUT_DIRS:
        top = REPO / name
        for path in [top, *top.glob("*"), *top.glob("*/*")]:
            with contextlib.suppress(FileNotFoundError):
                seen[str(path.relative_to(REPO))] = path.stat().st_mtime_ns
    return seen


@pytest.fixture(autouse=True)
def nothing_written_into_the_repository(request):
    """Fails a test that wrote into the repository's own outputs/ (or multirun/, lightning_logs/,
    data/): every run of a test belongs under its tmp_path."""
    before = repository_outputs()
    yield
    after = repository_outputs()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        pytest.fail(
            f"{request.node.nodeid} wrote into the repository: {', '.join(changed[:5])}. Fix: "
            "give each train.py run hydra.run.dir= (or hydra.sweep.dir= with -m) and data.root= "
            "under tmp_path."
        )


# --- TensorBoard ---------------------------------------------------------------------------------


def hparams_plugin_data(log_dir: Path) -> dict:
    """What TensorBoard's HPARAMS tab reads: metric tags and the run's hparam values."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {"metrics": [], "hparams": {}}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if not value.tag.startswith("_hparams_/"):
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                if data.HasField("experiment"):
                    found["metrics"] += [info.name.tag for info in data.experiment.metric_infos]
                if data.HasField("session_start_info"):
                    for name, hparam in data.session_start_info.hparams.items():
                        found["hparams"][name] = hparam.string_value or hparam.number_value
    return found


# Trained checkpoints and real photos for the predict and export tests.
HYMENOPTERA_VAL = SHARED_DATA / "hymenoptera_data" / "val"


def train_tiny(tmp_path_factory, name: str, *overrides: str) -> Path:
    """A 1-epoch run on a generated ants/bees folder: a real checkpoint of the two classes of
    the hymenoptera photos, in a few seconds."""
    root = tmp_path_factory.mktemp(f"{name}_photos")
    make_class_folders(root, {"ants": 4, "bees": 4})
    run_dir = tmp_path_factory.mktemp(f"{name}_run")
    result = run_train(*folder_overrides(root), *overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def lite0_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory, "lite0", "model=efficientnet_lite0")


def real_photos(folder: Path, per_class: int = 3, class_folders: bool = True) -> list[Path]:
    """A few hymenoptera val photos copied under `folder` (in class folders, or flat)."""
    if not HYMENOPTERA_VAL.is_dir():
        pytest.skip(f"{HYMENOPTERA_VAL} is not present")
    copied = []
    for class_name in ("ants", "bees"):
        for source in sorted((HYMENOPTERA_VAL / class_name).glob("*.jpg"))[:per_class]:
            target = folder / class_name / source.name if class_folders else folder / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copy(source, target)))
    return copied


def run_entry(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python predict.py ARGS` (or export.py) as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
