"""Several processes give the numbers one process gives.

One `trainer.devices=2` run (two CPU processes, DDP over gloo) on 9 validation and 7 test images
of 3 classes, evaluated in batches of 4 so that the two processes get shares of different sizes
(5 and 4 images: 2 batches and 1). Its numbers are compared with the same checkpoint evaluated
in one process, by plain PyTorch and by Lightning with the project's report.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.metrics import balanced_accuracy_score, f1_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_config, folder_overrides, make_class_folders, run_train
from finetune.calibration import expected_calibration_error
from finetune.class_scores import classification_report
from finetune.errors import FinetuneError
from finetune.module import ClassifierModule, load_classifier
from finetune.reports import EvaluationReport, confusion_image, per_class_accuracy
from finetune.run import build_datamodule
from finetune.top_losses import MAX_TOP_LOSSES, top_losses_image

SPLIT_COUNTS = {
    "train": {"ants": 4, "bees": 4, "wasps": 4},
    "val": {"ants": 4, "bees": 3, "wasps": 2},  # 9 images
    "test": {"ants": 3, "bees": 2, "wasps": 2},  # 7 images
}


def overrides(root: Path) -> list[str]:
    return [
        *folder_overrides(root),
        "data.eval_batch_size=4",
        "optim.optimizer.lr=0.001",  # a barely trained head: some images are misclassified
        "strategy.head_init=random",  # (the solved probe might classify them all)
    ]


def make_photos(tmp: Path) -> Path:
    """Class folders of generated photos under `tmp/photos`, one per split."""
    root = tmp / "photos"
    for split, counts in SPLIT_COUNTS.items():
        make_class_folders(root / split, counts, seed=len(split))
    return root


def train_on_two_processes(tmp: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    """train.py with `args` on 2 DDP processes into `tmp/run`, which must succeed."""
    run_dir = tmp / "run"
    result = run_train(
        *args, "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={run_dir}", cwd=tmp
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


# The head trains on images, or on features the frozen backbone extracted once (no
# augmentation): the first process extracts them before the second starts, which reads its file.
FEEDS = {"images": [], "cached_features": ["augment=none"]}


@pytest.fixture(scope="module", params=list(FEEDS))
def two_process_run(request, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(data folder, run dir, metrics.json) of one run with trainer.devices=2."""
    tmp = tmp_path_factory.mktemp("distributed")
    root = make_photos(tmp)
    run_dir, result = train_on_two_processes(tmp, *overrides(root), *FEEDS[request.param])
    second_log = (run_dir / "train_ddp_process_1.log").read_text()  # two processes ran
    # the closing line once, by rank 0, not once per process
    assert (result.stdout + result.stderr).count("Best checkpoint by val/acc") == 1
    assert "Best checkpoint by" not in second_log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if FEEDS[request.param]:
        assert metrics["feature_cache"] == "miss"  # the first process extracted them
        assert "Reusing cached features" in second_log  # the second read its file
    else:
        assert metrics["feature_cache"] == "off"
    return root, run_dir, metrics


def one_process_truth(module, datamodule, split: str) -> dict:
    """Each image of `split` once, in one process, without Lightning: accuracy, loss, confusion
    matrix, the misclassified `(path, true, predicted)` in split order, the highest losses
    `(path, loss)` and the expected calibration error."""
    samples = datamodule.splits.named()[split]
    dataset = datamodule.datasets[split]
    batch = (torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.tensor(0))
    images = datamodule.on_after_batch_transfer(batch, 0)[0]
    labels = torch.tensor([label for _, label in samples])
    with torch.no_grad():
        logits = module(images)
    preds = logits.argmax(dim=1)
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").tolist()
    ranked = sorted(range(len(samples)), key=lambda i: -losses[i])[:MAX_TOP_LOSSES]
    classes = datamodule.num_classes
    matrix = torch.bincount(labels * classes + preds, minlength=classes**2).view(classes, -1)
    return {
        "acc": float((preds == labels).float().mean()),
        "loss": float(module.criterion(logits, labels)),
        "matrix": matrix,
        "labels": labels,
        "preds": preds,
        "wrong": [
            (path, int(t), int(p)) for (path, t), p in zip(samples, preds, strict=True) if t != p
        ],
        "top_losses": [(samples[i][0], losses[i]) for i in ranked],
        "ece": expected_calibration_error(logits, labels),
    }


def tensorboard_images(run_dir: Path) -> dict[str, np.ndarray]:
    """The last image of each tag in the run's TensorBoard events, as RGB arrays."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return {
        tag: np.asarray(
            Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)).convert("RGB")
        )
        for tag in events.Tags()["images"]
    }


@pytest.mark.slow  # two processes: CI's slow step runs it
def test_two_processes_evaluate_each_image_once(two_process_run, tmp_path, record_fault):
    root, run_dir, metrics = two_process_run
    cfg = compose_config(overrides(root), tmp_path / "one", tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    module = load_classifier(metrics["best_checkpoint"])
    names = datamodule.class_names
    images = tensorboard_images(run_dir)
    checks = {}
    for split, count in (("val", 9), ("test", 7)):
        truth = one_process_truth(module, datamodule, split)
        matrix = metrics[f"{split}/confusion_matrix"]
        checks[split] = {
            "images": sum(map(sum, matrix)) == count,
            "matrix": matrix == truth["matrix"].tolist(),
            "acc": metrics[f"{split}/acc"] == pytest.approx(truth["acc"], abs=1e-6),
            "loss": metrics[f"{split}/loss"] == pytest.approx(truth["loss"], abs=1e-4),
            "per_class": list(metrics[f"{split}/acc_per_class"].values())
            == per_class_accuracy(truth["matrix"]),
            # torchmetrics synced over the processes, against scikit-learn on one's predictions
            "balanced_acc": metrics[f"{split}/balanced_acc"]
            == pytest.approx(balanced_accuracy_score(truth["labels"], truth["preds"]), abs=1e-6),
            "macro_f1": metrics[f"{split}/macro_f1"]
            == pytest.approx(
                f1_score(truth["labels"], truth["preds"], average="macro", zero_division=0),
                abs=1e-6,
            ),
            "report": classification_report(
                truth["preds"], truth["labels"], names, f"{split}: {count} images"
            )
            in (run_dir / "classification_report.txt").read_text(),
            "confusion_image": np.array_equal(
                images[f"{split}/confusion_matrix"],
                confusion_image(truth["matrix"], names, f"{split} confusion matrix"),
            ),
        }
        # the top losses: the same images in the same order, titled with the whole count
        shown = metrics[f"{split}/top_losses"]
        checks[split]["top_losses"] = [(e["path"], e["loss"]) for e in shown] == [
            (path, pytest.approx(loss, abs=1e-4)) for path, loss in truth["top_losses"]
        ]
        wrong = len(truth["wrong"])
        title = f"{split}: the {len(shown)} highest losses of {count} ({wrong} wrong)"
        expected = top_losses_image(shown, title)
        checks[split]["grid"] = np.array_equal(images[f"{split}/top_losses"], expected)
        checks[split]["ece"] = metrics[f"{split}/ece"] == pytest.approx(truth["ece"], abs=1e-4)
    record_fault(all(all(c.values()) for c in checks.values()))
    assert checks == {split: dict.fromkeys(c, True) for split, c in checks.items()}


@pytest.mark.slow  # two processes: CI's slow step runs it
def test_validation_inside_fit_scores_each_image_once(two_process_run, tmp_path):
    """The val/acc that chose the best checkpoint (the only epoch's) is that checkpoint's real
    accuracy on the 9 images, not one with a padded duplicate."""
    root, run_dir, metrics = two_process_run
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    scores = [
        float(state["best_model_score"])
        for key, state in last["callbacks"].items()
        if key.startswith("ModelCheckpoint") and state.get("monitor") == "val/acc"
    ]
    cfg = compose_config(overrides(root), tmp_path / "one", tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    truth = one_process_truth(load_classifier(metrics["best_checkpoint"]), datamodule, "val")
    assert scores == [pytest.approx(truth["acc"], abs=1e-6)]


@pytest.mark.slow  # two processes: CI's slow step runs it
def test_one_process_lightning_evaluation_equals_the_two_process_run(two_process_run, tmp_path):
    """The same checkpoint through Lightning in one process: the same metrics and report."""
    root, _, metrics = two_process_run
    cfg = compose_config(overrides(root), tmp_path / "one", tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    report = EvaluationReport(
        datamodule.class_names, {"val": datamodule.splits.val, "test": datamodule.splits.test}
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path / "tb", name="", version=""),
        callbacks=[report],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = load_classifier(metrics["best_checkpoint"])
    one = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    one |= trainer.test(module, datamodule=datamodule, verbose=False)[0]
    for name, value in one.items():
        name = name.removeprefix(ClassifierModule.EVALUATION_TAG)  # validation outside fit
        assert metrics[name] == pytest.approx(float(value), abs=1e-4), name
    assert_close({k: v for k, v in metrics.items() if k in report.results}, report.results)


def assert_close(two: object, one: object, path: str = "") -> None:
    """`two` equals `one` but for float rounding (1e-5): two processes sum in another order."""
    if isinstance(one, dict):
        assert isinstance(two, dict) and two.keys() == one.keys(), path
        for key in one:
            assert_close(two[key], one[key], f"{path}/{key}")
    elif isinstance(one, list):
        assert isinstance(two, list) and len(two) == len(one), path
        for index, (a, b) in enumerate(zip(two, one, strict=True)):
            assert_close(a, b, f"{path}[{index}]")
    elif isinstance(one, float):
        assert two == pytest.approx(one, abs=1e-5), path
    else:
        assert two == one, path


@pytest.mark.slow  # two processes
def test_two_processes_solve_the_same_probe_as_one(tmp_path):
    root = make_photos(tmp_path)
    probe = [*folder_overrides(root), "data.eval_batch_size=4", "augment=none"]
    results = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"run{devices}"
        extra = ["trainer.strategy=ddp"] if devices > 1 else []
        result = run_train(
            *probe, f"trainer.devices={devices}", *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        results[devices] = json.loads((run_dir / "metrics.json").read_text())
    one, two = results[1], results[2]
    assert two["probe_l2"] == one["probe_l2"]
    assert two["val/acc"] == pytest.approx(one["val/acc"]) == pytest.approx(one["probe_val_acc"])
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)


@pytest.mark.slow  # two processes
def test_lp_ft_on_two_processes_keeps_its_validated_probe_once(tmp_path):
    """The probe's validation before the first step runs in both processes (one share of the
    val images each, gathered), and both keep the same file; an lr that wrecks the network
    leaves the probe the best."""
    root = make_photos(tmp_path)
    lp_ft = ["data.eval_batch_size=4", "strategy=lp_ft", "optim.optimizer.lr=10"]
    run_dir, result = train_on_two_processes(tmp_path, *folder_overrides(root), *lp_ft)
    output = result.stdout + result.stderr
    assert output.count("The linear probe (val/acc") == 1
    assert "The linear probe (val/acc" not in (run_dir / "train_ddp_process_1.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == -1
    kept = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert sorted(kept) == sorted(["last.ckpt", Path(metrics["best_checkpoint"]).name])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    probe_acc = events.Scalars("val/acc")[0]
    assert probe_acc.step == 0
    assert metrics["val/acc"] == pytest.approx(probe_acc.value, abs=1e-6)


def test_an_evaluation_split_smaller_than_the_processes_is_refused(record_fault):
    """Each process must evaluate at least one image; Lightning's sampler only asserts it."""
    from finetune.data.loading import evaluation_sampler

    with pytest.raises(FinetuneError) as raised:
        evaluation_sampler(list(range(3)), "test", num_replicas=4, rank=0)
    message = str(raised.value)
    record_fault("trainer.devices=3" in message and "test split has 3" in message)
    assert "trainer.devices=3 or fewer" in message and "test split has 3 image(s)" in message


@pytest.mark.parametrize("size,processes", [(9, 2), (7, 3), (4, 4)])
def test_evaluation_shares_cover_each_image_once(size, processes):
    from finetune.data.loading import evaluation_sampler

    shares = [
        list(evaluation_sampler(list(range(size)), "val", num_replicas=processes, rank=rank))
        for rank in range(processes)
    ]
    assert sorted(i for share in shares for i in share) == list(range(size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_final_training_batch_of_one_is_dropped_per_process_share():
    """10 images in batches of 4: one process ends on a batch of 2, but two processes train on
    5 each and would each end on a batch of one (BatchNorm's statistics of a single image)."""
    from finetune.data import make_loader

    images = list(range(10))
    assert not make_loader(images, 4, train=True, num_workers=0).drop_last
    assert make_loader(images, 4, train=True, num_workers=0, processes=2).drop_last
    assert not make_loader(images, 4, train=False, num_workers=0, processes=2).drop_last


def test_the_evaluation_loss_is_the_mean_per_image_and_keeps_a_nan():
    """The mean each process's shares are added with: per image (a batch of 4 weighs four
    times a batch of one), and a NaN loss is reported, not dropped."""
    from finetune import backbones
    from finetune.module import ClassifierModule

    model = {"name": "resnet18", "source": "torchvision", "weights": "none"}
    optim = {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}}
    module = ClassifierModule(
        ["a", "b", "c"],
        model,
        optim,
        {"name": "constant"},
        network=backbones.build(model, 3, pretrained=False),
    )
    loss = module.eval_losses["val"]
    loss.update(torch.tensor(2.0), 4)
    loss.update(torch.tensor(1.0), 1)
    assert float(loss.compute()) == pytest.approx(1.8)
    loss.update(torch.tensor(float("nan")), 1)
    assert torch.isnan(loss.compute())
