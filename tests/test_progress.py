"""Progress of the long steps outside training: a bar on a terminal, and in a log (CI, a
pipe) only a line when each step starts and one when it ends."""

from __future__ import annotations

import io
import re

from conftest import TINY_MODEL, folder_overrides, make_class_folders, run_train
from finetune import progress


def test_without_a_terminal_a_step_logs_its_start_and_end_and_draws_no_bar(capsys, caplog):
    with (
        caplog.at_level("INFO", logger="finetune.progress"),
        progress.progress("Extracting features", 10, "images") as advance,
    ):
        for _ in range(3):
            advance(4)  # past the total: the count, not the plan, ends the step
    assert capsys.readouterr().out == ""
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "Extracting features: 10 images" and len(messages) == 2
    assert re.fullmatch(
        r"Extracting features: 12 images in \d+\.\d s( \(\d+\.\d images/s\))?"
        r", 2 more than the 10 planned",
        messages[1],
    )


def test_on_a_terminal_the_bar_counts_with_rate_and_time_left(monkeypatch):
    bars = []

    def recorded_bar(unit):
        bars.append(bar := make_bar(unit))
        bar.console.file = io.StringIO()  # the terminal it would draw on
        return bar

    make_bar = progress.terminal_bar
    monkeypatch.setattr(progress, "interactive", lambda: True)
    monkeypatch.setattr(progress, "terminal_bar", recorded_bar)
    with progress.progress("Verifying", 4, "images") as advance:
        advance(3)
        advance(3)  # past the planned total: the bar's total grows
        task = bars[0].tasks[0]
        assert (task.completed, task.total) == (6, 6)
    columns = [type(column).__name__ for column in bars[0].columns]
    assert columns[2:] == [
        "MofNCompleteColumn", "Rate", "TimeElapsedColumn", "TextColumn", "TimeRemainingColumn",
        "TextColumn",
    ]  # fmt: skip
    assert bars[0].live.transient and bars[0].finished  # gone once the step ends


def test_a_narrow_terminal_shortens_the_bar_never_the_rate_unit_or_the_times():
    from rich.console import Console

    bar = progress.terminal_bar("L2 strengths")
    task = bar.add_task("Solving the linear probe", total=13)
    bar.update(task, advance=5)
    narrow = Console(file=io.StringIO(), width=70, force_terminal=True, color_system=None)
    with narrow.capture() as captured:
        narrow.print(bar.make_tasks_table(bar.tasks))
    text = captured.get()
    assert "L2 strengths/s" in text, text
    assert re.search(r"\d:\d\d:\d\d elapsed, (-:--:--|\d:\d\d:\d\d) left", text), text


def test_a_run_in_a_log_has_each_steps_lines_and_no_bar(tmp_path):
    """last_layer on a folder: verification, feature extraction and the probe's solve."""
    make_class_folders(tmp_path / "photos", {"ants": 4, "bees": 4})
    run_dir = tmp_path / "run"
    result = run_train(
        *folder_overrides(tmp_path / "photos"), *TINY_MODEL, f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for step, unit in (
        ("Verifying that every image decodes", "images"),
        ("Extracting features", "images"),
        ("Solving the linear probe", "L2 strengths"),
    ):
        assert re.search(rf"{step}: \d+ {unit}\n", output), step
        assert re.search(rf"{step}: \d+ {unit} in \d+\.\d s", output), step
    assert "━" not in output and "\r" not in output  # no bar, no redrawn line
