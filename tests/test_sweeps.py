"""Sweeps and dashboards: the sweep summary, TensorBoard contents, Optuna search, the notebook."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST_OVERRIDES, REPO, TINY_MODEL, hparams_plugin_data, run_train
from finetune import summary
from finetune.run import train


def fake_run(sweep: Path, job: str, overrides: list[str], metrics: dict | None) -> None:
    (sweep / job / ".hydra").mkdir(parents=True)
    (sweep / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (sweep / job / "metrics.json").write_text(json.dumps(metrics))


def test_summary_of_a_two_by_two_sweep_has_four_rows_and_the_right_aggregates(tmp_path):
    accuracies = {
        ("last_layer", 1): 0.9,
        ("last_layer", 2): 0.8,
        ("full", 1): 0.7,
        ("full", 2): 0.5,
    }
    for job, ((strategy, seed), acc) in enumerate(accuracies.items()):
        metrics = {
            "val/acc": acc,
            "test/acc": acc - 0.1,
            "trainable_params": 10 if strategy == "last_layer" else 1000,
            "fit_seconds": 1.5,
            "split_sizes": {"train": 20},
            "model": "m",
            "strategy": strategy,
            "seed": seed,
        }
        fake_run(tmp_path, str(job), [f"strategy={strategy}", f"seed={seed}"], metrics)

    rows = summary.write_summary(tmp_path)

    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    with (tmp_path / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["strategy"] for r in table] == ["last_layer", "last_layer", "full", "full"]
    assert [float(r["val_acc"]) for r in table] == [0.9, 0.8, 0.7, 0.5]
    aggregates = {entry["strategy"]: entry for entry in summary.aggregate(rows)}
    assert aggregates["last_layer"]["val_acc_mean"] == pytest.approx(0.85)
    assert aggregates["last_layer"]["val_acc_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert aggregates["full"]["val_acc_mean"] == pytest.approx(0.6)
    assert aggregates["full"]["test_acc_mean"] == pytest.approx(0.5)
    assert aggregates["full"]["runs"] == 2 and aggregates["full"]["failed"] == 0
    markdown = (tmp_path / "summary.md").read_text()
    assert "Mean +- std over seeds" in markdown and "0.8500 +- 0.0707" in markdown
    # seconds as 1.5, not 1.5000; the mean table has the time too
    assert [r["fit_seconds"] for r in table] == ["1.5"] * 4
    mean_rows = markdown[markdown.index("Mean +- std") :].splitlines()
    assert "fit seconds" in mean_rows[2] and "| 1.5 +- 0.0 |" in mean_rows[4]
    # the table of summary.csv, column for column
    header = next(line for line in markdown.splitlines() if line.startswith("| job"))
    csv_header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert [c.strip() for c in header.strip("|").split("|")] == [
        c.replace("_", " ") for c in csv_header
    ]
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_the_end_of_a_sweep_prints_its_mean_table_capped(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(summary, "plot", lambda rows, path: None)  # the chart is not the point
    lrs = [f"{k}e-4" for k in range(1, summary.CONSOLE_ROWS + 6)]  # 35 combinations
    for job, (lr, seed) in enumerate((lr, seed) for lr in lrs for seed in (1, 2)):
        metrics = {"val/acc": 0.5 + seed / 10, "strategy": "full", "seed": seed}
        fake_run(tmp_path, str(job), [f"optim.lr={lr}", f"seed={seed}"], metrics)
    with caplog.at_level("INFO", logger="finetune.summary"):
        summary.write_summary(tmp_path)
    printed = caplog.text
    assert f"Sweep summary: {tmp_path / 'summary.md'}" in printed
    assert "Mean +- std over seeds:" in printed
    assert "| optim.lr | runs | failed | val acc |" in printed
    assert "| 1e-4 | 2 | 0 | 0.6500 +- 0.0707 |" in printed
    assert f"| {lrs[summary.CONSOLE_ROWS - 1]} | 2 |" in printed  # the 30th row
    assert f"| {lrs[summary.CONSOLE_ROWS]} | 2 |" not in printed  # the 31st: only in the file
    assert f"| {lrs[summary.CONSOLE_ROWS]} | 2 |" in (tmp_path / "summary.md").read_text()
    assert "... 5 more row(s) in summary.md" in printed


def test_summary_can_be_run_by_hand_on_a_sweep_folder(tmp_path):
    fake_run(tmp_path, "0", ["strategy=full"], {"val/acc": 0.5, "strategy": "full"})
    fake_run(tmp_path, "1", ["strategy=scratch"], None)  # killed: no metrics, no failure.json
    result = subprocess.run(
        [sys.executable, "-m", "finetune.summary", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["strategy"], r["status"]) for r in rows] == [("full", "ok"), ("scratch", "failed")]
    assert "did not finish" in rows[1]["error"]


@pytest.mark.parametrize(
    ("folder", "message"),
    [("missing", "does not exist"), ("run", "is a single run, not a sweep"), ("empty", "holds no")],
)
def test_summary_by_hand_on_a_folder_that_is_no_sweep_is_one_line(tmp_path, folder, message):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "finetune.summary", str(tmp_path / folder)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        message in result.stderr
        and "Fix: give the folder of a `train.py -m` sweep" in result.stderr
    )
    assert not list((tmp_path / "run").glob("summary.*"))


def test_a_run_that_left_a_swept_key_at_its_default_shows_the_value_it_ran_with(tmp_path):
    """Compared with runs that typed them, a default run's strategy and epochs were blank."""
    fake_run(tmp_path, "0", [], {"val/acc": 0.9, "strategy": "last_layer"})
    (tmp_path / "0" / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"strategy": "last_layer"}}}})
    )
    (tmp_path / "0" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": "auto"}}))
    fake_run(tmp_path, "1", ["strategy=full", "trainer.max_epochs=2"], {"val/acc": 0.8})
    rows = summary.write_summary(tmp_path)
    assert [row["overrides"] for row in rows] == [
        {"strategy": "last_layer", "trainer.max_epochs": "auto"},
        {"strategy": "full", "trainer.max_epochs": "2"},
    ]
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["strategy"], r["trainer.max_epochs"]) for r in table] == [
        ("last_layer", "auto"),
        ("full", "2"),
    ]


@pytest.mark.slow  # four jobs; test_faults' failing sweep job covers it in the default run
def test_a_sweep_with_a_failing_run_still_finishes_and_summarises_it(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        "augment=none",
        "data.train_fraction=0.5,1.0",
        # more blocks than the network has: found at run time, so every second job fails
        "strategy=top_k",
        "strategy.k=2,100",
        f"data.root={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed"]
    assert "asks for more blocks than the 8" in rows[1]["error"]
    assert [r["data.train_fraction"] for r in rows] == ["0.5", "0.5", "1.0", "1.0"]
    # stratified subset: half of the 4 images per class of the synthetic set
    assert (int(rows[0]["train_images"]), int(rows[2]["train_images"])) == (6, 12)
    assert "2 failed" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").is_file()


def test_tensorboard_holds_scalars_images_hparams_and_the_weights_report(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        "trainer.max_epochs=2",
        "optim.optimizer.lr=0.0001",  # a barely trained head: some images are misclassified
        "strategy.head_init=random",  # (the solved probe might classify them all)
    )
    train(cfg)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    for scalar in ("train/loss_epoch", "train/acc", "val/loss", "val/acc"):
        assert scalar in tags["scalars"], scalar
    assert any(tag.startswith("lr-") for tag in tags["scalars"])
    for stage in ("val", "test"):
        assert f"{stage}/confusion_matrix" in tags["images"]
        assert f"{stage}/top_losses" in tags["images"]
        assert f"{stage}/reliability" in tags["images"]
        assert {
            f"best/{stage}/{score}_per_class/{name}"
            for name in ("circle", "square", "stripes")
            for score in ("acc", "precision", "recall", "f1")
        } <= set(tags["scalars"])
    assert "weights/load_report/text_summary" in tags["tensors"]
    hparams = hparams_plugin_data(run_dir / "tensorboard")
    assert {"final/val_acc", "final/test_acc"} <= set(hparams["metrics"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    matrix = metrics["val/confusion_matrix"]
    assert sum(map(sum, matrix)) == metrics["split_sizes"]["val"]
    correct = sum(matrix[i][i] for i in range(len(matrix)))
    assert correct / metrics["split_sizes"]["val"] == pytest.approx(metrics["val/acc"])


FLAKY_SEARCH = """# @package _global_
defaults:
  - optuna
hydra:
  sweeper:
    n_trials: 4
    sampler:
      seed: 3
    params:
      optim.optimizer.lr: tag(log, interval(0.001, 0.1))
      data.train_fraction: choice(1.0, 3.0)
      trainer.max_epochs: choice(1, 2)
"""


def test_optuna_search_survives_a_failed_trial(tmp_path):
    extra = tmp_path / "conf" / "hparams_search"
    extra.mkdir(parents=True)
    (extra / "flaky.yaml").write_text(FLAKY_SEARCH)
    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        *TINY_MODEL,
        "augment=none",
        "hparams_search=flaky",
        f"hydra.searchpath=[file://{REPO / 'conf'},file://{tmp_path / 'conf'}]",
        f"data.root={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    statuses = {r["data.train_fraction"]: r["status"] for r in rows}
    assert statuses.get("3.0") == "failed" and statuses.get("1.0") == "ok"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["data.train_fraction"] == 1.0


@pytest.mark.slow  # a 4-run sweep and a kernel: CI's slow step
def test_notebook_executes_against_a_sweep(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    sweep = tmp_path / "sweep"
    result = run_train(
        "-m",
        *FAST_OVERRIDES,
        "augment=none",
        "strategy=last_layer,full",
        "data.train_fraction=0.5,1.0",
        f"data.root={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 4

    path = REPO / "notebooks" / "compare_strategies.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    monkeypatch.setenv("SWEEP_DIR", str(sweep))  # the kernel inherits the environment
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3


def test_summary_png_is_written_atomically(tmp_path, monkeypatch):
    # a kill mid-write leaves the previous figure, never half of one
    from matplotlib.figure import Figure

    rows = [{"status": "ok", "val_acc": 0.5, "overrides": {}, "strategy": "full", "seed": 1}]
    monkeypatch.setattr(summary, "aggregate", lambda rows: [])
    (tmp_path / "summary.png").write_bytes(b"previous")

    def half_then_killed(self, handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        summary.plot(rows, tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.png"]


def test_learning_curves_only_when_the_training_fraction_varies():
    def rows(*fractions):
        return [{"overrides": {"data.train_fraction": f, "strategy": s}} for f, s in fractions]

    assert summary.shows_learning_curves(rows(("0.25", "full"), ("1.0", "full")))
    # one fraction for every run, strategies swept: bars per strategy, not a one-point curve
    assert not summary.shows_learning_curves(rows(("0.25", "full"), ("0.25", "last_layer")))
    assert not summary.shows_learning_curves([{"overrides": {"strategy": "full"}}])


def test_the_accuracy_axis_zooms_to_the_data_so_close_results_differ_visibly():
    table = [
        {"val_acc_mean": 0.951, "val_acc_std": 0.0},
        {"val_acc_mean": 0.954, "val_acc_std": 0.002},
    ]
    low, high = summary.accuracy_range(table)
    assert 0.9 < low < 0.951 and 0.956 < high < 0.99
    assert 1.0 < summary.accuracy_range([{"val_acc_mean": 1.0, "val_acc_std": 0.0}])[1] <= 1.02
    assert summary.accuracy_range([{"val_acc_mean": 0.3, "val_acc_std": 0.4}])[0] == 0.0
    assert summary.accuracy_range([]) == (0.0, 1.02)


def test_tensorboard_names_a_sweeps_runs_by_their_swept_values(tmp_path):
    """TensorBoard names a run by its folder: `tensorboard --logdir <sweep>/tensorboard` shows
    `model=resnet18,strategy=full`, not `0/tensorboard`."""
    metrics = {"val/acc": 0.9, "fit_seconds": 1.0, "split_sizes": {"train": 4}}
    for job, strategy in enumerate(["last_layer", "full"]):
        fake_run(tmp_path, str(job), ["data=synthetic", f"strategy={strategy}"], metrics)
        (tmp_path / str(job) / "tensorboard").mkdir()
        (tmp_path / str(job) / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    fake_run(tmp_path, "2", ["data=synthetic", "strategy=top_k"], None)  # failed: no events
    summary.write_summary(tmp_path)
    links = sorted((tmp_path / "tensorboard").iterdir())
    assert [link.name for link in links] == ["strategy=full", "strategy=last_layer"]
    assert all(link.is_symlink() for link in links)
    assert links[0].resolve() == (tmp_path / "1" / "tensorboard").resolve()
    assert (links[1] / "events.out.tfevents.1").is_file()
    summary.write_summary(tmp_path)  # again (by hand): the same links
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == [
        "strategy=full",
        "strategy=last_layer",
    ]


def drawn_chart(rows, path: Path, monkeypatch):
    """The axis summary.png is drawn on (the figure kept open to be read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    summary.plot(rows, path)
    monkeypatch.undo()
    (figure,) = figures
    plt.close(figure)
    return figure.axes[0]


def test_each_bar_of_the_chart_names_the_swept_values_it_holds_and_the_averaged_axis(
    tmp_path, monkeypatch
):
    """A sweep of strategy x learning rate x seed drew four bars labelled `m / full` twice and
    `m / last_layer` twice: which bar held which learning rate was nowhere on the chart."""
    runs = [
        (strategy, lr, seed)
        for strategy in ("last_layer", "full")
        for lr in ("0.01", "0.1")
        for seed in (1, 2)
    ]
    for job, (strategy, lr, seed) in enumerate(runs):
        overrides = [f"strategy={strategy}", f"optim.optimizer.lr={lr}", f"seed={seed}"]
        metrics = {"val/acc": 0.5 + job / 100, "model": "m", "strategy": strategy, "seed": seed}
        fake_run(tmp_path, str(job), overrides, metrics)
    rows = summary.collect(tmp_path)

    axis = drawn_chart(rows, tmp_path / "summary.png", monkeypatch)
    assert [label.get_text() for label in axis.get_xticklabels()] == [
        f"strategy={strategy}\noptim.optimizer.lr={lr}"
        for strategy in ("last_layer", "full")
        for lr in ("0.01", "0.1")
    ]
    title = axis.get_title()
    assert "strategy x optim.optimizer.lr" in title
    assert "mean +- std over seed, 2 runs each" in title

    # learning curves: one per combination of the other swept values, named by them
    for row in rows:
        job = int(row["job"])
        row["overrides"]["data.train_fraction"] = "0.5" if job % 2 else "1.0"
        row["train_images"] = 10 if job % 2 else 20
    axis = drawn_chart(rows, tmp_path / "summary.png", monkeypatch)
    assert sorted(text.get_text() for text in axis.get_legend().get_texts()) == sorted(
        f"strategy={strategy}, optim.optimizer.lr={lr}"
        for strategy in ("last_layer", "full")
        for lr in ("0.01", "0.1")
    )
    assert "one run each" in axis.get_title()  # seed and fraction vary together here


def test_fit_seconds_are_averaged_per_feature_cache_state_never_across_them(tmp_path):
    """The first seed extracted the features (two minutes), the others read them (seconds):
    their mean, 41.7 +- 67.8 s, was neither time. Each run now shows its cache state, and the
    mean table averages seconds per state."""
    runs = [  # strategy, seed, fit seconds, metrics.json's cache entries
        ("last_layer", 1, 120.0, {"feature_cache": "miss"}),
        ("last_layer", 2, 2.0, {"feature_cache": "hit"}),
        ("last_layer", 3, 3.0, {"feature_cache": "hit"}),
        ("full", 1, 50.0, {"feature_cache": "off"}),
        ("full", 2, 52.0, {"feature_cache": "off"}),
        # the clean features read, the augmented views' extracted: it extracted
        ("full", 3, 60.0, {"feature_cache": "hit", "views_cache": "miss"}),
    ]
    for job, (strategy, seed, seconds, cache) in enumerate(runs):
        metrics = {"val/acc": 0.8, "fit_seconds": seconds, "strategy": strategy, **cache}
        fake_run(tmp_path, str(job), [f"strategy={strategy}", f"seed={seed}"], metrics)

    rows = summary.write_summary(tmp_path)

    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["feature_cache"] for r in table] == ["miss", "hit", "hit", "off", "off", "miss"]
    probe, full = summary.aggregate(rows)
    assert probe["fit_seconds_mean"] is None  # no mean of minutes and seconds
    assert probe["fit_seconds_by_cache"] == {
        "miss": {"mean": 120.0, "std": 0.0, "runs": 1},
        "hit": {"mean": 2.5, "std": pytest.approx(0.7071, rel=1e-3), "runs": 2},
    }
    assert probe["feature_cache"] == "1 miss, 2 hit"
    assert full["feature_cache"] == "1 miss, 2 off"
    markdown = (tmp_path / "summary.md").read_text()
    mean_rows = markdown[markdown.index("Mean +- std") :].splitlines()
    assert mean_rows[2].rstrip().endswith("| fit seconds | feature cache |")
    assert "| miss 120.0 +- 0.0 (1); hit 2.5 +- 0.7 (2) | 1 miss, 2 hit |" in mean_rows[4]
    assert "| miss 60.0 +- 0.0 (1); off 51.0 +- 1.4 (2) | 1 miss, 2 off |" in mean_rows[5]
    assert "Compare times within one state" in markdown

    # runs of one state keep one mean, and the table no note
    for job in ("0", "5"):
        shutil.rmtree(tmp_path / job)
    rows = summary.write_summary(tmp_path)
    probe, full = summary.aggregate(rows)
    assert probe["fit_seconds_mean"] == 2.5 and probe["feature_cache"] == "hit"
    assert full["fit_seconds_mean"] == 51.0 and full["feature_cache"] == "off"
    assert "Compare times within one state" not in (tmp_path / "summary.md").read_text()
