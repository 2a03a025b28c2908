"""Class imbalance: data.class_weights (scikit-learn's balanced weights, or named weights) in
every way the head trains, and the balanced training sampler (data.sampler)."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from omegaconf import OmegaConf
from sklearn.utils.class_weight import compute_class_weight

from conftest import (
    TINY_MODEL,
    compose_config,
    data_module,
    folder_overrides,
    make_class_folders,
    run_train,
)
from finetune import features, probe, resume_config
from finetune.backbones import InputSpec
from finetune.config import ConfigError, validate
from finetune.data.balance import BalancedSampler, class_weights
from finetune.module import load_classifier
from finetune.run import train

SPEC = InputSpec(
    crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear"
)
# val_fraction 0.2 leaves 10, 5 and 2 training images.
COUNTS = {"big": 12, "mid": 6, "small": 3}
TRAIN_COUNTS = [10, 5, 2]


@pytest.fixture(autouse=True)
def empty_memory_cache():
    features.clear_memory_cache()
    yield
    features.clear_memory_cache()


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    make_class_folders(folder, COUNTS)
    return folder


def prepared(root: Path, **options):
    small = {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "decode_cache_mb": 0}
    module = data_module("imagefolder", root, SPEC, **{**small, **options})
    module.prepare_data()
    return module


def test_balanced_weights_are_scikit_learns_formula_on_the_training_split(photos):
    module = prepared(photos, class_weights="balanced")
    labels = [label for _, label in module.splits.train]
    assert Counter(labels) == dict(enumerate(TRAIN_COUNTS))
    # n_samples / (n_classes * bincount): the training split's, not the whole folder's
    expected = [17 / (3 * count) for count in TRAIN_COUNTS]
    assert module.class_weight == pytest.approx(expected, rel=1e-12)
    sklearn = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert module.class_weight == pytest.approx(list(sklearn), rel=1e-12)
    assert prepared(photos).class_weight is None  # the default: none


def test_named_weights_leave_the_other_classes_at_one(photos):
    module = prepared(photos, class_weights={"small": 4.0, "big": 0.5})
    assert module.class_weight == [0.5, 1.0, 4.0]


def test_an_unknown_class_name_is_refused_before_the_images_are_verified(photos):
    (photos / "big" / "broken.jpg").write_bytes(b"not an image")  # verification would stop
    with pytest.raises(ConfigError) as caught:
        prepared(photos, class_weights={"smal": 4.0})
    message = str(caught.value)
    assert "data.class_weights names smal" in message
    assert "(classes: big, mid, small)" in message and "smal -> small?" in message


@pytest.mark.parametrize("weight", [0, -1.0, "heavy", float("inf")])
def test_a_weight_that_is_not_a_number_above_zero_is_refused(photos, weight):
    with pytest.raises(ConfigError, match="gives class small the weight"):
        prepared(photos, class_weights={"small": weight})


def test_balanced_refuses_a_class_without_training_images():
    with pytest.raises(ConfigError, match="c has none in the training split"):
        class_weights("balanced", ["a", "b", "c"], [0, 0, 1])


@pytest.mark.parametrize(
    ("override", "refusal"),
    [
        ("data.class_weights=balance", "Did you mean `balanced`?"),
        ("data.class_weights=2", "takes none, balanced, any dict"),
        ("data.sampler=weighted", "`data.sampler=weighted` is not one of: none, balanced"),
    ],
)
def test_the_config_refuses_other_values(tmp_path, override, refusal):
    cfg = compose_config(["data=imagefolder", override], tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=refusal):
        validate(cfg)
    named = compose_config(["data=imagefolder", "data.class_weights={a: 2}"], tmp_path, tmp_path)
    validate(named)  # a mapping is accepted
    assert dict(named.data.class_weights) == {"a": 2}


# --- the balanced sampler -----------------------------------------------------------------------

LABELS = [0] * 90 + [1] * 10


def drawn(sampler) -> list[int]:
    return [index for _, index in sampler]


def test_the_balanced_sampler_draws_every_class_equally_often_seeded_per_epoch():
    sampler = BalancedSampler(LABELS, seed=3)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(LABELS) and {epoch for epoch, _ in first} == {0}
    assert {epoch for epoch, _ in second} == {1} and first != second
    # Over 20 epochs the minority class (10 %) fills about half of the draws.
    draws = [i for _ in range(18) for i in drawn(sampler)] + drawn(first) + drawn(second)
    share = sum(LABELS[i] for i in draws) / len(draws)
    assert 0.45 < share < 0.55
    # A sampler made for a resumed run at epoch 1 draws what the first one drew then.
    assert list(BalancedSampler(LABELS, seed=3, epoch=1)) == second
    assert list(BalancedSampler(LABELS, seed=4)) != first
    global_state = torch.random.get_rng_state()
    list(BalancedSampler(LABELS, seed=3))
    assert torch.equal(torch.random.get_rng_state(), global_state)


def test_with_several_processes_each_draws_its_own_share_of_one_list():
    """Lightning wraps a custom training sampler in its DistributedSamplerWrapper: each process
    iterates its own sampler and keeps every num_replicas-th draw of a shuffled order. The
    seeded samplers draw the same list in every process, so the shares make up that list."""
    single = BalancedSampler(LABELS, seed=3)
    single.set_epoch(2)
    whole = Counter(single)
    shares = []
    for rank in (0, 1):
        wrapper = DistributedSamplerWrapper(
            BalancedSampler(LABELS, seed=3), num_replicas=2, rank=rank, shuffle=True
        )
        wrapper.set_epoch(2)  # passed on to the sampler
        shares.append(list(wrapper))
    assert [len(share) for share in shares] == [50, 50]
    assert Counter(shares[0]) + Counter(shares[1]) == whole


def test_the_training_loader_uses_the_balanced_sampler_and_the_probe_its_expected_loss(photos):
    module = prepared(photos, sampler="balanced")
    module.batch_size = 5  # no final batch of one, which the loader would drop
    module.setup("fit")
    loader = module.train_dataloader()
    assert isinstance(loader.sampler, BalancedSampler)
    labels = torch.cat([batch[1] for batch in loader])
    assert len(labels) == sum(TRAIN_COUNTS)
    # The solved probe sees each image once: its loss is weighted by the balanced weights
    # (the sampler's expected loss), times data.class_weights' when given.
    balanced = [17 / (3 * count) for count in TRAIN_COUNTS]
    assert module.solved_class_weight(None).tolist() == pytest.approx(balanced)
    weights = torch.tensor([1.0, 2.0, 3.0])
    expected = [b * w for b, w in zip(balanced, [1.0, 2.0, 3.0], strict=True)]
    assert module.solved_class_weight(weights).tolist() == pytest.approx(expected)
    assert torch.equal(prepared(photos).solved_class_weight(weights), weights)


@pytest.mark.slow  # two processes
def test_two_processes_train_with_the_balanced_sampler_and_weights(photos, tmp_path):
    """Lightning wraps the sampler in each DDP process (its shares: the test above); the
    (epoch, index) keys reach the images, and the weights the checkpoint."""
    run_dir = tmp_path / "run"
    args = [*folder_overrides(photos), *TINY_MODEL, "strategy=full", "data.sampler=balanced"]
    result = run_train(
        *args,
        "data.class_weights=balanced",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "train_ddp_process_1.log").is_file()  # two processes trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    module = load_classifier(metrics["best_checkpoint"])
    assert module.hparams.class_weight == pytest.approx([17 / (3 * n) for n in TRAIN_COUNTS])


# --- every way the head trains ------------------------------------------------------------------


def head(checkpoint: str) -> tuple[torch.Tensor, torch.Tensor]:
    classifier = load_classifier(checkpoint).network.get_classifier()
    return classifier.weight.detach(), classifier.bias.detach()


def cached(metrics: dict) -> dict[str, torch.Tensor]:
    return torch.load(metrics["feature_cache_file"], weights_only=True)["features"]


def run(make_cfg, tmp_path, photos, name: str, *overrides: str) -> dict:
    cfg = make_cfg(*folder_overrides(photos), *TINY_MODEL, "augment=none", *overrides, fast=False)
    cfg.run_dir = str(tmp_path / name)
    return train(cfg)


def test_the_weights_reach_the_solved_probe_lp_ft_and_the_checkpoint(
    make_cfg, tmp_path, photos, caplog
):
    weighted = run(make_cfg, tmp_path, photos, "probe", "data.class_weights=balanced")
    balanced = [17 / (3 * count) for count in TRAIN_COUNTS]
    # The checkpoint says how its loss weighed the classes.
    module = load_classifier(weighted["best_checkpoint"])
    assert module.hparams.class_weight == pytest.approx(balanced)
    assert module.criterion.class_weight.tolist() == pytest.approx(balanced)
    # Its head is the probe solved with the weighted loss on the cached features.
    extracted = cached(weighted)
    datamodule = prepared(photos)
    train_labels = torch.tensor([label for _, label in datamodule.splits.train])
    val_labels = torch.tensor([label for _, label in datamodule.splits.val])
    solve = {"val_features": extracted["val"], "val_labels": val_labels}
    expected = probe.solve(
        extracted["train"], train_labels, 3, **solve, class_weight=torch.tensor(balanced)
    )
    plain = probe.solve(extracted["train"], train_labels, 3, **solve)
    weight, bias = head(weighted["best_checkpoint"])
    assert torch.allclose(weight, expected.weight, atol=1e-5)
    assert torch.allclose(bias, expected.bias, atol=1e-5)
    assert not torch.allclose(bias, plain.bias, atol=1e-3)
    # LP-FT's probe phase solves the same weighted loss on the same features.
    lp_ft = run(
        make_cfg, tmp_path, photos, "lp_ft", "strategy=lp_ft", "data.class_weights=balanced"
    )
    assert lp_ft["feature_cache"] == "hit"
    for key in ("probe_l2", "probe_val_acc", "probe_val_loss"):
        assert lp_ft[key] == pytest.approx(weighted[key], rel=1e-6)
    assert weighted["probe_val_loss"] != pytest.approx(plain.val_loss, rel=1e-3)
    # The balanced sampler's expected loss is the balanced-weighted loss: the same probe.
    with caplog.at_level(logging.INFO, logger="finetune.data.balance"):
        sampled = run(make_cfg, tmp_path, photos, "sampled", "data.sampler=balanced")
    assert "the solved linear probe sees every training image once" in caplog.text
    sampled_weight, sampled_bias = head(sampled["best_checkpoint"])
    assert torch.allclose(sampled_weight, weight, atol=1e-5)
    assert torch.allclose(sampled_bias, bias, atol=1e-5)
    assert load_classifier(sampled["best_checkpoint"]).hparams.class_weight is None


@pytest.mark.parametrize("strategy", ["full", "last_layer"])
def test_gradient_training_runs_with_named_weights_and_the_balanced_sampler(
    make_cfg, tmp_path, photos, strategy
):
    """On images (full) and on cached features with the optimizer training a random head:
    the loader's (epoch, index) keys of the sampler reach both kinds of dataset."""
    options = ["strategy.head_init=random"] if strategy == "last_layer" else []
    metrics = run(
        make_cfg,
        tmp_path,
        photos,
        strategy,
        f"strategy={strategy}",
        *options,
        "data.class_weights={small: 3.0}",
        "data.sampler=balanced",
    )
    assert metrics["splits_served_as_features"] == (["train", "val"] if options else [])
    module = load_classifier(metrics["best_checkpoint"])
    assert module.hparams.class_weight == [1.0, 1.0, 3.0]
    assert np.isfinite(metrics["val/loss"])


# --- resuming -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.class_weights=balanced", "data.class_weights: 'none' in the run, 'balanced' now"),
        ("data.class_weights={small: 2}", "data.class_weights: 'none' in the run, None now"),
        ("data.sampler=balanced", "data.sampler: 'none' in the run, 'balanced' now"),
    ],
)
def test_a_resume_that_changes_the_weighting_is_refused(make_cfg, tmp_path, override, named):
    saved = OmegaConf.create(OmegaConf.to_container(make_cfg()))
    changes = resume_config.config_changes(saved, make_cfg(override))
    with pytest.raises(resume_config.ResumeRefused) as caught:
        resume_config.check_changes(changes, tmp_path, [override])
    assert named in str(caught.value)
    # A run saved before the keys existed resumes with them at their defaults.
    del saved.data["class_weights"], saved.data["sampler"]
    changes = resume_config.config_changes(saved, make_cfg())
    assert changes == {
        "data.class_weights": (resume_config.ABSENT, "none"),
        "data.sampler": (resume_config.ABSENT, "none"),
    }
    resume_config.check_changes(changes, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_class_weights_follow_the_module_to_the_training_device():
    from finetune.module import ClassifierModule

    model = {"name": "resnet18", "source": "torchvision", "weights": "none"}
    module = ClassifierModule(
        ["a", "b", "c"], model, {}, {"name": "constant"}, class_weight=[1.0, 2.0, 3.0]
    ).cuda()
    assert module.criterion.class_weight.device.type == "cuda"
    logits = module(torch.zeros(2, 3, 64, 64, device="cuda"))
    labels = torch.tensor([0, 2], device="cuda")
    expected = torch.nn.functional.cross_entropy(
        logits.cpu(), labels.cpu(), weight=torch.tensor([1.0, 2.0, 3.0])
    )
    assert module.criterion(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)
