"""benchmarks/accuracy.py: its cases, the targets' pass/fail, the page and its merge, and one
tiny end-to-end run (a generated hymenoptera folder, one epoch) through real train.py processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_class_folders, subprocess_env

sys.path.insert(0, str(REPO / "benchmarks"))
import accuracy
import accuracy_page

TINY = [  # train.py overrides for seconds-long runs; not a measurement
    "trainer.max_epochs=1",
    "data.num_workers=0",
    "data.batch_size=4",
    "data.eval_batch_size=8",
]


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def by_target(rows: list[dict]) -> dict[str, dict]:
    return {row["target"]: row for row in rows}


def test_the_cases_are_the_documented_runs_and_choose_only_model_data_strategy_augment_seed():
    cases = {case.id: case for case in accuracy.all_cases()}
    assert {c.strategy for c in cases.values() if c.dataset == "flowers102"} == {
        None,  # the bare forward pass
        "last_layer",
        "lp_ft",
        "full",
    }
    assert [c.seed for c in cases.values() if c.id.startswith("hymenoptera/lp_ft/")] == [0, 1, 2]
    assert (
        cases["hymenoptera/last_layer_noaug/warm"].cache_of == "hymenoptera/last_layer_noaug/cold"
    )
    for case in cases.values():
        if case.strategy:
            keys = {override.split("=")[0] for override in case.overrides()}
            assert keys <= {"model", "data", "strategy", "augment", "seed"}
    # every case a target reads exists
    for target in accuracy.TARGETS:
        references = [*target.cases, target.over, target.target]
        named = [r.split(":")[0] for r in references if isinstance(r, str)]
        assert set(named) <= set(cases), target.row


def test_only_selects_by_id_prefix_or_glob_and_a_warm_run_brings_its_cold_run():
    cases = accuracy.all_cases()
    ids = [c.id for c in accuracy.select(cases, ["hymenoptera/last_layer"])]
    assert ids == [f"hymenoptera/last_layer/seed{seed}" for seed in (0, 1, 2)]
    ids = [c.id for c in accuracy.select(cases, ["*/last_layer_noaug/warm", "flowers102/lp_ft"])]
    assert ids == [
        "hymenoptera/last_layer_noaug/cold",
        "hymenoptera/last_layer_noaug/warm",
        "flowers102/lp_ft",
    ]
    assert len(accuracy.select(cases, None)) == len(cases)
    with pytest.raises(SystemExit, match=r"--only flowers/full matches no case; `--list`"):
        accuracy.select(cases, ["flowers/full"])


def test_summary_compares_means_ratios_and_other_runs_values_with_the_targets():
    runs = {
        "flowers102/bare_forward": {"work_seconds": 100.0, "wall_seconds": 110.0},
        "flowers102/last_layer_noaug": {"val_acc": 0.869, "run_seconds": 130.0},
        "flowers102/last_layer": {"val_acc": 0.88, "run_seconds": 901.0},
        "flowers102/lp_ft": {"error": "RuntimeError: train.py exited with 1"},
        "hymenoptera/last_layer/seed0": {"val_acc": 0.96, "fit_seconds": 100.0},
        "hymenoptera/last_layer/seed1": {"val_acc": 0.95, "fit_seconds": 120.0},
        "hymenoptera/last_layer/seed2": {"val_acc": 0.93, "fit_seconds": 140.0},
        "hymenoptera/full/seed0": {"val_acc": 0.99, "fit_seconds": 10.0},
        "hymenoptera/scratch": {"val_acc": 0.6},
        "hymenoptera/bare_forward": {
            "work_seconds": 14.0,
            "wall_seconds": 20.0,
            "import_torch_wall_seconds": 3.0,
            "import_run_wall_seconds": 6.0,
        },
        "hymenoptera/last_layer_noaug/cold": {"val_acc": 0.9412},
        "hymenoptera/last_layer_noaug/warm": {"val_acc": 0.9412, "wall_seconds": 4.0},
    }
    rows = by_target(accuracy.summarise(runs))
    probe = rows["flowers102 last_layer, no augmentation: val acc"]
    assert (probe["measured"], probe["goal"], probe["passed"]) == (0.869, 0.87, False)
    ratio = rows["flowers102 last_layer, no augmentation: run s / bare forward pass s"]
    assert (ratio["measured"], ratio["passed"]) == (1.3, True)  # <= 1.3 holds at 1.3
    assert rows["flowers102 last_layer: val acc"]["passed"] is True  # >= at the target
    assert rows["flowers102 last_layer: run s (15 min)"]["passed"] is False
    failed = rows["flowers102 lp_ft: val acc"]  # the run failed: not measured
    assert (failed["measured"], failed["passed"]) == (None, None)
    seeds = rows["hymenoptera last_layer: val acc, mean of 3 seeds"]
    assert (seeds["measured"], seeds["passed"]) == (0.9467, False)  # mean 0.9467 < 0.95
    assert rows["hymenoptera last_layer: fit s, mean of 3 seeds"]["measured"] == 120.0
    assert rows["hymenoptera last_layer: fit s, mean of 3 seeds"]["passed"] is True
    # one seed of three is not a mean of three
    assert rows["hymenoptera full: val acc, mean of 3 seeds"]["passed"] is None
    scratch = rows["hymenoptera scratch: val acc"]
    assert (scratch["measured"], scratch["passed"]) == (0.6, None)
    same = rows["hymenoptera last_layer, no augmentation, warm cache: val acc = cold"]
    assert (same["goal"], same["passed"]) == (0.9412, True)
    warm = "hymenoptera last_layer, no augmentation, warm cache: wall s / bare forward pass wall s"
    assert (rows[warm]["measured"], rows[warm]["passed"]) == (0.2, False)  # < 0.2 is strict
    floor = "hymenoptera warm run's floor, {}: wall s / bare forward wall s"
    torch_only = rows[floor.format("a process importing torch")]
    assert (torch_only["measured"], torch_only["passed"]) == (0.15, None)  # reported only
    assert rows[floor.format("importing finetune.run")]["measured"] == 0.3

    runs["hymenoptera/last_layer_noaug/warm"] = {"val_acc": 0.9346, "wall_seconds": 3.9}
    rows = by_target(accuracy.summarise(runs))
    assert (
        rows["hymenoptera last_layer, no augmentation, warm cache: val acc = cold"]["passed"]
        is False
    )
    assert rows[warm]["passed"] is True


def test_a_runs_line_holds_metrics_json_and_the_measurement_and_leaves_out_what_is_absent():
    case = accuracy.Case("flowers102/lp_ft", "flowers102", "lp_ft")
    metrics = {
        "val/acc": 0.951234,
        "val/acc_top5": 0.99,
        "fit_seconds": 1500.5,
        "run_seconds": 1540.0,
        "best_epoch": 7,
        "epochs": 9,
        "seed": 42,
        "feature_cache": "miss",
        "adaptive": {"max_epochs": 9, "lr": 0.01},
    }
    record = accuracy.run_record(case, {"wall_seconds": 1550.0, "peak_memory_mb": 3000}, metrics)
    assert record == {
        "augment": "default",
        "seed": 42,
        "val_acc": 0.9512,
        "val_acc_top5": 0.99,
        "fit_seconds": 1500.5,
        "run_seconds": 1540.0,
        "wall_seconds": 1550.0,
        "peak_memory_mb": 3000,
        "best_epoch": 7,
        "epochs": 9,
        "feature_cache": "miss",
        "adaptive": {"max_epochs": 9, "lr": 0.01},
    }  # no test/acc: the test images are held out


def test_a_subset_keeps_the_earlier_pages_other_runs_and_a_full_run_replaces_them(tmp_path):
    table = tmp_path / "docs" / "accuracy.md"
    known = [case.id for case in accuracy.all_cases()]
    earlier = {
        "flowers102/full": {"case": "flowers102/full", "val_acc": 0.93, "date": "d1"},
        "flowers102/lp_ft": {"case": "flowers102/lp_ft", "val_acc": 0.94, "date": "d1"},
        "gone/case": {"case": "gone/case", "val_acc": 0.5},
    }
    for run in earlier.values():
        run["machine"] = "old box"
    accuracy_page.write(table, earlier, [], "python benchmarks/accuracy.py", "old box")
    new = {"flowers102/lp_ft": {"case": "flowers102/lp_ft", "val_acc": 0.96, "date": "d2"}}

    merged = accuracy_page.merge_runs(table, new, known, subset=True, here="new box")
    assert list(merged) == ["flowers102/lp_ft", "flowers102/full"]  # the cases' order
    assert merged["flowers102/lp_ft"] == {**new["flowers102/lp_ft"], "machine": "new box"}
    assert merged["flowers102/full"]["val_acc"] == 0.93
    assert list(accuracy_page.merge_runs(table, new, known, False, "new box")) == [
        "flowers102/lp_ft"
    ]

    rows = accuracy.summarise(merged)
    accuracy_page.write(table, merged, rows, "python benchmarks/accuracy.py --only x", "new box")
    page = table.read_text()
    assert "| flowers102 lp_ft: val acc | 0.96 | >= 0.95 | pass |" in page
    assert "| flowers102 full: val acc | 0.93 | >= 0.95 | **fail** |" in page
    assert "| flowers102 last_layer: val acc | - | >= 0.88 | not measured |" in page
    assert "measured on old box: flowers102/full" in page
    assert "- Machine: new box" in page
    saved = json.loads(table.with_suffix(".json").read_text())
    assert saved["runs"] == merged and saved["command"].endswith("--only x")


def test_the_page_shows_the_adaptive_rules_choices_and_a_failed_runs_error():
    runs = {
        "flowers102/full": {"case": "flowers102/full", "adaptive": {"max_epochs": 30, "lr": 0.1}},
        "flowers102/lp_ft": {"case": "flowers102/lp_ft", "error": "RuntimeError: exited with 1"},
    }
    page = accuracy_page.render(runs, [], "cmd", "today", "box")
    assert "max_epochs=30, lr=0.1" in page
    assert "| RuntimeError: exited with 1 |" in page


def test_a_missing_data_folder_stops_with_one_sentence(tmp_path):
    result = run_benchmark("--data-root", str(tmp_path), "--only", "flowers102/full")
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    assert f"{tmp_path / 'flowers-102'} is missing; pass --data-root DIR" in message


def test_the_bare_forward_loop_reads_flowers102s_train_and_val(flowers_root):
    import plain_loops

    splits = plain_loops.image_folders(flowers_root, None, None, "flowers102")
    assert {split: len(data) for split, data in splits.items()} == {"train": 1020, "val": 1020}


@pytest.mark.slow  # a dozen tiny train.py runs: CI's slow step
def test_a_tiny_run_prints_a_line_per_run_a_summary_and_merges_into_the_page(tmp_path):
    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2)):
        make_class_folders(data / "hymenoptera_data" / split, {"ants": count, "bees": count})
    table = tmp_path / "docs" / "accuracy.md"
    earlier = {"flowers102/full": {"case": "flowers102/full", "val_acc": 0.96, "machine": "m"}}
    accuracy_page.write(table, earlier, [], "earlier", "m")
    extra = [word for override in TINY for word in ("--extra", override)]
    only = ["--only", "hymenoptera/bare_forward", "--only", "hymenoptera/last_layer_noaug/warm"]
    arguments = ["--data-root", str(data), "--work-dir", str(tmp_path / "work"), *only]
    result = run_benchmark(*arguments, "--table", str(table), *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    runs, summary = {line["case"]: line for line in lines[:-1]}, lines[-1]
    assert list(runs) == [
        "hymenoptera/bare_forward",
        "hymenoptera/last_layer_noaug/cold",  # the warm run needs it
        "hymenoptera/last_layer_noaug/warm",
    ]
    assert runs["hymenoptera/bare_forward"]["images"] == 12
    floors = [
        runs["hymenoptera/bare_forward"][f"import_{m}_wall_seconds"] for m in ("torch", "run")
    ]
    assert 0 < floors[0] < floors[1] < 60
    for name, cache in (("cold", "miss"), ("warm", "hit")):
        run = runs[f"hymenoptera/last_layer_noaug/{name}"]
        assert run["feature_cache"] == cache
        assert (run["dataset"], run["strategy"], run["augment"], run["seed"]) == (
            "hymenoptera",
            "last_layer",
            "none",
            42,
        )
        assert 0 <= run["val_acc"] <= 1 and run["epochs"] == 1 and run["best_epoch"] == 0
        assert run["wall_seconds"] > run["run_seconds"] >= run["fit_seconds"] > 0
        assert run["peak_memory_mb"] > 100
        assert "val_acc_top5" not in run and "test_acc" not in run  # 2 classes, no test split
    assert (tmp_path / "work" / "hymenoptera" / "last_layer_noaug" / "warm" / "run").is_dir()

    assert summary["run"] == "summary"
    rows = by_target(summary["targets"])
    same = rows["hymenoptera last_layer, no augmentation, warm cache: val acc = cold"]
    assert same["passed"] is True
    assert rows["flowers102 full: val acc"]["measured"] == 0.96  # kept from the earlier page
    page = table.read_text()
    assert "| hymenoptera/last_layer_noaug/warm | last_layer | none | 42 |" in page
    assert "| flowers102/full |" in page
    assert str(data) not in page and "--data-root DATA_ROOT" in page


def test_a_benchmark_stopped_by_sigterm_stops_the_run_it_measures(tmp_path):
    """A killed benchmark must not leave its training behind: it would share the CPU with
    every later measurement."""
    pid_file = tmp_path / "child.pid"
    child = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import common; "
            f"common.run_measured([sys.executable, '-c', {child!r}])",
        ],
        env=subprocess_env(),
    )
    for _ in range(300):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    parent.terminate()
    exit_code = parent.wait(timeout=30)
    for _ in range(100):  # gone, or a zombie waiting for a reaper that is not the benchmark
        status = Path(f"/proc/{child_pid}/status")
        if not status.is_file() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the measured command outlived the benchmark")
    assert exit_code == 128 + signal.SIGTERM
