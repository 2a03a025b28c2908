"""The linear probe solved to convergence (finetune.probe) and the strategies that start from it:
last_layer (the probe is the training on cached features; augmented epochs continue from it)
and lp_ft (every layer fine-tunes from it)."""

import fnmatch
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune import features, probe
from finetune.resume import ResumeRefused
from finetune.run import train


@pytest.fixture(autouse=True)
def empty_memory_cache():
    features.clear_memory_cache()
    yield
    features.clear_memory_cache()


def blobs(n_per_class: int, classes: int, dims: int, spread: float, seed: int):
    """Gaussian blobs with a feature scale far from 1 (as pooled features are)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), dims, generator=generator) * spread
    return (centres[labels] + noise) * 40 + 7, labels


def reference_objective(x, y, classes, l2):
    """The probe's objective in float64 over standardised features, for scipy."""
    x = x.double()
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    dims = x.shape[1]

    def objective(flat):
        params = torch.tensor(flat, requires_grad=True)
        weight, bias = params[: classes * dims].view(classes, dims), params[classes * dims :]
        loss = (
            torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * (weight**2).sum()
        )
        loss.backward()
        return loss.item(), params.grad.numpy()

    return objective, classes * dims + classes


def test_solve_reaches_the_optimum_a_float64_solver_finds():
    x, y = blobs(30, 4, 16, spread=2.0, seed=0)
    val_x, val_y = blobs(10, 4, 16, spread=2.0, seed=1)
    solution = probe.solve(x, y, 4, val_x, val_y)
    objective, size = reference_objective(x, y, 4, solution.l2)
    reference = minimize(objective, np.zeros(size), jac=True, method="L-BFGS-B", tol=1e-14)
    # Our head over raw features, mapped onto standardised ones, gives the objective's value.
    mean, std = x.mean(0), x.std(0, unbiased=False)
    weight = solution.weight * std
    bias = solution.bias + solution.weight @ mean
    ours = objective(np.concatenate([weight.double().flatten(), bias.double()]))[0]
    assert ours == pytest.approx(reference.fun, rel=1e-4)


def test_l2_is_chosen_by_validation_accuracy_along_a_strongest_first_path():
    x, y = blobs(8, 5, 64, spread=6.0, seed=2)  # few, noisy images: regularisation matters
    val_x, val_y = blobs(40, 5, 64, spread=6.0, seed=3)
    solution = probe.solve(x, y, 5, val_x, val_y)
    strengths = [point["l2"] for point in solution.path]
    # the grid, then what grew past the edge the choice sat on
    assert strengths[: len(probe.L2_GRID)] == sorted(probe.L2_GRID, reverse=True)
    assert min(strengths) < solution.l2 < max(strengths)
    accuracies = [point["val_acc"] for point in solution.path]
    assert solution.val_acc == pytest.approx(max(accuracies), abs=1e-6)
    assert solution.l2 == strengths[accuracies.index(max(accuracies))]
    # The head computes the chosen classifier over raw features: its val accuracy is the path's.
    head = torch.nn.Linear(64, 5)
    solution.copy_into(head)
    with torch.no_grad():
        accuracy = (head(val_x).argmax(1) == val_y).float().mean().item()
    assert accuracy == pytest.approx(solution.val_acc, abs=1e-6)


@pytest.mark.parametrize("grid", [(100.0, 31.6), (1e-4, 1e-5)])
def test_a_choice_at_an_edge_of_the_grid_grows_the_grid_until_it_is_inside(grid):
    """Both grids lie to one side of the best strength for this data (chosen near 3 and near
    1e-4 with the whole grid): the grid grows a step at a time past the chosen edge."""
    generator = torch.Generator().manual_seed(0)

    def noisy(n):
        labels = torch.randint(0, 3, (n,), generator=generator)
        features = torch.randn(n, 20, generator=generator)
        features[:, 0] += labels
        return features, labels

    (x, y), (val_x, val_y) = noisy(60), noisy(60)
    solution = probe.solve(x, y, 3, val_x, val_y, l2_grid=grid)
    strengths = [point["l2"] for point in solution.path]
    assert strengths[:2] == list(grid) and len(strengths) > 2
    assert min(strengths) < solution.l2 < max(strengths)
    ascending = sorted(strengths)  # one geometric grid, of the given grid's step
    ratios = [high / low for low, high in itertools.pairwise(ascending)]
    assert ratios == pytest.approx([grid[0] / grid[1]] * len(ratios))


def test_the_grid_grows_a_bounded_number_of_steps_and_says_when_the_choice_stays_at_its_edge(
    caplog,
):
    """Validation labels the training ones cannot predict: ever stronger L2 validates better,
    and the grid stops growing after MAX_GRID_EXTENSIONS steps; the choice still sits at the
    edge, which the run is told and metrics.json records."""
    x, y = blobs(10, 3, 8, spread=1.0, seed=4)
    with caplog.at_level("WARNING", logger="finetune.probe"):
        solution = probe.solve(x, y, 3, x, (y + 1) % 3, l2_grid=(1.0, 0.1))
    strengths = [point["l2"] for point in solution.path]
    assert len(strengths) == 2 + probe.MAX_GRID_EXTENSIONS
    assert solution.l2 == max(strengths) == pytest.approx(10.0**probe.MAX_GRID_EXTENSIONS)
    assert solution.report()["probe_l2_at_edge"] is True
    assert "still at the strong edge" in caplog.text
    assert f"grew {probe.MAX_GRID_EXTENSIONS} steps" in caplog.text
    # a choice inside the grid is not flagged
    caplog.clear()
    val_x, val_y = blobs(40, 5, 64, spread=6.0, seed=3)
    with caplog.at_level("WARNING", logger="finetune.probe"):
        inside = probe.solve(*blobs(8, 5, 64, spread=6.0, seed=2), 5, val_x, val_y)
    assert inside.report()["probe_l2_at_edge"] is False and "edge" not in caplog.text


def test_without_validation_one_strength_is_solved():
    x, y = blobs(10, 3, 8, spread=1.0, seed=4)
    solution = probe.solve(x, y, 3)
    assert len(solution.path) == 1 and solution.val_acc is None


def test_empty_or_mismatched_features_are_refused():
    with pytest.raises(ValueError, match="at least one training image"):
        probe.solve(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="N labels"):
        probe.solve(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"class_weight must be \(2,\)"):
        probe.solve(
            torch.zeros(3, 4),
            torch.zeros(3, dtype=torch.long),
            2,
            None,
            None,
            class_weight=torch.ones(3),
        )


RESNET18 = {"name": "resnet18", "source": "torchvision", "weights": "none"}


def head_gradients(module, x, y, loss) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of `loss(module(x), y)` for the head's weight and bias."""
    head = module.network.get_classifier()
    module.zero_grad()
    loss(module(x), y).backward()
    return head.weight.grad.clone(), head.bias.grad.clone()


def test_the_solved_probe_is_the_optimum_of_the_modules_training_loss():
    from finetune.module import ClassifierModule

    x, y = blobs(20, 3, 512, spread=8.0, seed=6)  # resnet18's 512 features, overlapping classes
    module = ClassifierModule(
        ["a", "b", "c"], RESNET18, {"label_smoothing": 0.1}, {"name": "constant"}
    ).eval()
    solution = probe.solve(x, y, 3, label_smoothing=module.criterion.label_smoothing)
    solution.copy_into(module.network.get_classifier())
    # At the solve's optimum the training loss's gradient is the L2 term's alone: over
    # standardised features (W_s = W std) the objective's gradient, loss + l2/2 |W_s|^2, is 0.
    std = x.std(dim=0, unbiased=False)
    weight_grad, bias_grad = head_gradients(module, x, y, module.criterion)
    standardised = weight_grad / std + solution.l2 * solution.weight * std
    assert standardised.abs().max() < 1e-4 and bias_grad.abs().max() < 1e-4
    # It is not the optimum of the plain cross-entropy, and solving that one gives another head.
    plain_grad, _ = head_gradients(module, x, y, torch.nn.CrossEntropyLoss())
    assert (plain_grad / std + solution.l2 * solution.weight * std).abs().max() > 1e-2
    plain = probe.solve(x, y, 3)
    assert (plain.weight - solution.weight).abs().max() > 1e-3 * solution.weight.abs().max()


def test_the_solved_probe_is_the_optimum_of_the_modules_class_weighted_loss():
    """data.class_weights reaches the module's criterion (weights in class order, saved in its
    hyper-parameters) and the probe solves that same loss: zero gradient at its optimum."""
    from finetune.module import ClassifierModule

    x, y = blobs(20, 3, 512, spread=8.0, seed=8)
    weights = [0.2, 5.0, 1.0]
    module = ClassifierModule(
        ["a", "b", "c"], RESNET18, {}, {"name": "constant"}, class_weight=weights
    ).eval()
    assert module.hparams.class_weight == weights
    assert module.criterion.class_weight.tolist() == pytest.approx(weights)  # float32
    loss = module.criterion
    solution = probe.solve(
        x, y, 3, label_smoothing=loss.label_smoothing, class_weight=loss.class_weight
    )
    solution.copy_into(module.network.get_classifier())
    std = x.std(dim=0, unbiased=False)
    weight_grad, bias_grad = head_gradients(module, x, y, module.criterion)
    standardised = weight_grad / std + solution.l2 * solution.weight * std
    assert standardised.abs().max() < 1e-4 and bias_grad.abs().max() < 1e-4
    # Gradient training of the unweighted module's loss would move this head (over 10 times
    # the tolerance above).
    unweighted = ClassifierModule(["a", "b", "c"], RESNET18, {}, {"name": "constant"}).eval()
    solution.copy_into(unweighted.network.get_classifier())
    plain_grad, _ = head_gradients(unweighted, x, y, unweighted.criterion)
    assert (plain_grad / std + solution.l2 * solution.weight * std).abs().max() > 1e-3


def test_the_probe_solves_the_class_weighted_loss_when_given_one():
    x, y = blobs(20, 3, 16, spread=8.0, seed=7)
    class_weight = torch.tensor([4.0, 1.0, 1.0])
    solution = probe.solve(x, y, 3, class_weight=class_weight)
    head = torch.nn.Linear(16, 3)
    solution.copy_into(head)
    loss = torch.nn.CrossEntropyLoss(weight=class_weight)(head(x), y)
    loss.backward()
    std = x.std(dim=0, unbiased=False)
    assert (head.weight.grad / std + solution.l2 * solution.weight * std).abs().max() < 1e-4
    assert head.bias.grad.abs().max() < 1e-4
    unweighted = probe.solve(x, y, 3)
    assert (unweighted.bias - solution.bias).abs().max() > 1e-2


def checkpoint_head(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {name: tensor for name, tensor in state.items() if ".classifier." in name}


def test_last_layer_on_cached_features_is_the_solved_probe(make_cfg, tmp_path):
    # Gradient clipping and accumulation work as in any run (the epochs step at lr 0).
    cfg = make_cfg(
        "strategy=last_layer",
        "augment=none",
        "trainer.max_epochs=2",
        "trainer.gradient_clip_val=1.0",
        "trainer.accumulate_grad_batches=2",
    )
    metrics = train(cfg)
    # (a hit when an earlier test extracted the same features)
    assert metrics["feature_cache"] in ("hit", "miss") and metrics["probe_l2"] in probe.L2_GRID
    # Nothing trains after the solve: every epoch's checkpoint holds the same head, and the
    # run's validation accuracy is the probe's.
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    first, last = (
        checkpoint_head(metrics["best_checkpoint"]),
        checkpoint_head(checkpoints / "last.ckpt"),
    )
    for name, tensor in first.items():
        assert torch.equal(tensor, last[name])
    assert metrics["val/acc"] == pytest.approx(metrics["probe_val_acc"], abs=1e-6)


def cached_tensors(run_metrics: dict, pattern: str, **fields) -> dict[str, torch.Tensor]:
    """The tensors of the feature cache file next to the run's whose name matches `pattern`
    and whose key holds `fields` (other tests of the session share the cache folder)."""
    folder = Path(run_metrics["feature_cache_file"]).parent
    stored = [torch.load(path, weights_only=True) for path in sorted(folder.glob(pattern))]
    [match] = [
        entry
        for entry in stored
        if all(json.loads(entry["fields"]).get(k) == v for k, v in fields.items())
    ]
    return match["features"]


def test_last_layer_with_augmentation_solves_the_probe_on_augmented_views(make_cfg, tmp_path):
    clean = train(make_cfg("strategy=last_layer", "augment=none"))
    cfg = make_cfg("strategy=last_layer", "strategy.augmented_views=2")
    cfg.run_dir = str(tmp_path / "views")
    metrics = train(cfg)
    # The probe is the whole training, as without augmentation: one epoch on features.
    assert (metrics["probe_augmented_views"], clean["probe_augmented_views"]) == (2, 0)
    assert metrics["epochs"] == 1 and metrics["splits_served_as_features"] == ["train", "val"]
    assert metrics["feature_cache"] == "hit"  # the clean features are the un-augmented run's
    assert metrics["views_cache"] == "miss" and "views_cache" not in clean
    assert fnmatch.fnmatch(Path(metrics["views_cache_file"]).name, "*-views-*.pt")
    cfg.run_dir = str(tmp_path / "views_again")
    assert train(cfg)["views_cache"] == "hit"  # the second run reads the views' file
    # Its head is the probe solved on the clean features and both views, all labelled.
    clean_features = cached_tensors(clean, Path(clean["feature_cache_file"]).name)
    views = cached_tensors(metrics, "*-views-*.pt", views=2, seed=cfg.seed)["views"]
    from finetune.run import build_datamodule

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    labels = torch.tensor([label for _, label in datamodule.splits.train])
    val_labels = torch.tensor([label for _, label in datamodule.splits.val])
    assert views.shape == (2 * len(labels), clean_features["train"].shape[1])
    expected = probe.solve(
        torch.cat([clean_features["train"], views]),
        labels.repeat(3),
        datamodule.num_classes,
        clean_features["val"],
        val_labels,
    )
    head = checkpoint_head(metrics["best_checkpoint"])
    weight = next(t for n, t in head.items() if n.endswith("weight"))
    assert torch.allclose(weight, expected.weight, atol=1e-5)
    assert metrics["probe_l2"] == expected.l2
    # The views differ from the clean features: they are augmented.
    assert not torch.allclose(views[: len(labels)], clean_features["train"])


def test_augmented_views_are_the_training_presets_seeded_draws(make_cfg):
    """View k of image i is the training preset's draw seeded by `(seed, k, i)`; the global
    generator is left alone; the second call reads the cache file."""
    import pytorch_lightning as pl

    from finetune import backbones
    from finetune.data import ImageListDataset
    from finetune.run import build_datamodule
    from finetune.transforms import train_transform

    cfg = make_cfg("strategy=last_layer")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    network = backbones.build(cfg.model, num_classes=datamodule.num_classes, pretrained=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    before = torch.random.get_rng_state()
    views, report = features.augmented_views(datamodule, network, trainer, views=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert report["feature_cache"] == "miss"
    samples = datamodule.splits.train
    dataset = ImageListDataset(
        samples, train_transform(network.input_spec, datamodule.augment), seed=5
    )
    network.eval()
    with torch.no_grad():
        for view, index in [(0, 0), (1, 0), (1, len(samples) - 1)]:
            image, _ = dataset[(view, index)]
            expected = network.forward_features(image[None])[0]
            assert torch.allclose(views[view * len(samples) + index], expected, atol=1e-4)
    again, report = features.augmented_views(datamodule, network, trainer, views=2, seed=5)
    assert report["feature_cache"] == "hit" and torch.equal(again, views)
    features.clear_memory_cache()
    other, report = features.augmented_views(datamodule, network, trainer, views=2, seed=6)
    assert report["feature_cache"] == "miss" and not torch.allclose(other, views)


def test_the_probe_trains_on_by_sgd_when_the_features_are_not_cached(make_cfg, tmp_path, caplog):
    solved = train(make_cfg("strategy=last_layer", "augment=none", "optim.label_smoothing=0.1"))
    # A rate that wrecks the head (not so far that the loss explodes: that stops the run): its
    # epoch is worse on val than the probe it started from.
    # Label smoothing: the probe is solved and validated with the training loss, smoothed.
    cfg = make_cfg(
        "strategy=last_layer",
        "strategy.cache_features=false",
        "optim.optimizer.lr=2",
        "optim.label_smoothing=0.1",
    )
    cfg.run_dir = str(tmp_path / "sgd")
    with caplog.at_level(logging.INFO, logger="finetune.run"):
        trained = train(cfg)
    # The same features (eval preprocessing) give the same probe; the augmented epoch then
    # trains the head on from it on images, so its head differs from the solved one.
    assert trained["feature_cache"] == "hit" and trained["splits_served_as_features"] == []
    assert trained["probe_l2"] == solved["probe_l2"]
    assert trained["probe_val_acc"] == solved["probe_val_acc"]
    solved_head = checkpoint_head(solved["best_checkpoint"])
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    trained_head = checkpoint_head(last)
    assert any(not torch.equal(trained_head[n], t) for n, t in solved_head.items())
    # The probe is validated before the first step as every epoch is (step 0 of the val
    # curves), competes for the best checkpoint and wins: the run returns it, not its epoch.
    events = EventAccumulator(str(Path(cfg.run_dir) / "tensorboard"))
    events.Reload()
    (probe_acc, epoch_acc), (probe_loss, epoch_loss) = (
        [point.value for point in events.Scalars(tag)] for tag in ("val/acc", "val/loss")
    )
    assert events.Scalars("val/acc")[0].step == 0
    assert (epoch_acc, -epoch_loss) < (probe_acc, -probe_loss)
    assert trained["best_epoch"] == -1
    # every epoch's time, though the best checkpoint (whose state the evaluation restores)
    # was saved before any
    assert len(trained["train_epoch_seconds"]) == trained["epochs"] == 1
    best = Path(trained["best_checkpoint"])
    assert best.name == f"probe-val_acc{probe_acc:.4f}.ckpt"
    assert sorted(p.name for p in last.parent.iterdir()) == sorted(["last.ckpt", best.name])
    for name, tensor in solved_head.items():
        torch.testing.assert_close(checkpoint_head(best)[name], tensor)
    assert trained["val/acc"] == pytest.approx(probe_acc, abs=1e-6)
    assert trained["val/loss"] == pytest.approx(probe_loss, rel=1e-4)
    # the solve's validation loss is the training loss, smoothed, as the epochs' is
    assert trained["probe_val_loss"] == pytest.approx(probe_loss, rel=1e-4)
    # ranked on a tie by the loss the epochs are ranked by
    states = torch.load(best, weights_only=True)["callbacks"]
    (ties,) = [state["tie_values"] for state in states.values() if "tie_values" in state]
    assert ties[str(best)] == pytest.approx(probe_loss, rel=1e-4)
    assert f"Best checkpoint by val/acc {probe_acc:.4f}: the linear probe, before training on" in (
        caplog.text
    )
    random_start = train(make_cfg("strategy=last_layer", "strategy.head_init=random"))
    assert "probe_l2" not in random_start and random_start["feature_cache"] == "off"


@pytest.mark.slow  # four runs: CI's slow step
def test_lp_ft_solves_the_head_then_trains_every_layer_and_resumes_without_solving(
    make_cfg, tmp_path, caplog
):
    cfg = make_cfg("strategy=lp_ft", "trainer.max_epochs=1")
    metrics = train(cfg)
    assert metrics["strategy"] == "lp_ft" and "probe_l2" in metrics
    # the solved probe competes for the best checkpoint: fine-tuning never returns less on val
    assert metrics["val/acc"] >= metrics["probe_val_acc"] - 1e-6
    assert metrics["trainable_params"] == metrics["total_params"]
    # Fine-tuning starts from the solved head: at learning rate 0 the head stays the probe's.
    frozen_cfg = make_cfg("strategy=lp_ft", "trainer.max_epochs=1", "optim.optimizer.lr=0")
    frozen_cfg.run_dir = str(tmp_path / "lr0")
    at_zero = checkpoint_head(train(frozen_cfg)["best_checkpoint"])
    probe_cfg = make_cfg("strategy=last_layer", "augment=none")
    probe_cfg.run_dir = str(tmp_path / "probe")
    solved = checkpoint_head(train(probe_cfg)["best_checkpoint"])
    for name, tensor in solved.items():
        torch.testing.assert_close(at_zero[name], tensor)
    # A resume never solves again (the checkpoint holds the head) and reports the probe the
    # run started from, as the uninterrupted run does.
    resumed_cfg = make_cfg("strategy=lp_ft", "trainer.max_epochs=2", "ckpt_path=last")
    resumed_cfg.run_dir = cfg.run_dir
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune.probe"):
        resumed = train(resumed_cfg)
    assert "Linear probe solved" not in caplog.text and resumed["epochs"] == 2
    assert resumed["probe_l2"] == metrics["probe_l2"]
    assert resumed["probe_path"] == metrics["probe_path"]


def test_resuming_a_finished_probe_offers_another_strategy_not_more_epochs(make_cfg):
    """More epochs of the solved probe change nothing (its steps run at lr 0): the refusal
    must not offer them as the fix."""
    cfg = make_cfg("strategy=last_layer", "augment=none")
    train(cfg)
    again = make_cfg("strategy=last_layer", "augment=none", "ckpt_path=last")
    again.run_dir = cfg.run_dir
    with pytest.raises(ResumeRefused, match="Nothing to resume") as refused:
        train(again)
    assert "strategy=lp_ft" in str(refused.value)
    assert "trainer.max_epochs=" not in str(refused.value)


def test_a_fast_dev_run_keeps_no_probe_candidate(make_cfg):
    """Lightning writes no checkpoint under fast_dev_run; neither does the probe's candidacy."""
    cfg = make_cfg("strategy=lp_ft", "trainer.fast_dev_run=true")
    metrics = train(cfg)
    assert not (Path(cfg.run_dir) / "checkpoints").exists()
    assert metrics["best_checkpoint"] == "" and metrics["best_epoch"] == 0
