"""Progress of the long steps outside training: feature extraction, the verification of a
folder, the probe's solve, the sweep summary (training epochs have Lightning's bar).

On a terminal, a bar with the count, the rate and the time left, gone when the step ends; in a
log (stdout not a terminal: CI, a file, a pipe) no bar, so that the log holds no redrawn lines.
Either way one line when the step starts and one when it ends, with its time and rate.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


def interactive() -> bool:
    """Whether stdout is a terminal a bar can redraw itself on."""
    return sys.stdout.isatty()


@contextlib.contextmanager
def progress(what: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A step of `total` `unit`s (e.g. 153 images), described by `what` ("Extracting
    features"); yields `advance(n)`, to call as each n are done (past `total` too: the bar's
    total grows). Logs `what: total unit` at the start and `what: done unit in S s (R unit/s)`
    at the end (not when the step raised)."""
    log.info("%s: %d %s", what, total, unit)
    started = time.perf_counter()
    done = 0

    def count(n: int = 1) -> None:
        nonlocal done
        done += n

    if interactive() and total > 0:
        with terminal_bar(unit) as bar:
            task = bar.add_task(what, total=total)

            def advance(n: int = 1) -> None:
                count(n)
                bar.update(task, advance=n, total=max(total, done))

            yield advance
    else:
        yield count
    seconds = time.perf_counter() - started
    rate = f" ({done / seconds:.1f} {unit}/s)" if seconds > 0 and done > 0 else ""
    grew = f", {done - total} more than the {total} planned" if done > total else ""
    log.info("%s: %d %s in %.1f s%s%s", what, done, unit, seconds, rate, grew)


def terminal_bar(unit: str):
    """Rich's progress bar: description, bar, done/total, rate, elapsed and time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

    def whole() -> Column:  # a narrow terminal shortens the description, not the numbers
        return Column(no_wrap=True, overflow="ignore")

    return Progress(
        TextColumn("{task.description}", table_column=Column(ratio=2, overflow="fold")),
        BarColumn(bar_width=None, table_column=Column(ratio=1)),
        MofNCompleteColumn(table_column=whole()),
        Rate(table_column=whole()),
        TimeElapsedColumn(table_column=whole()),
        TextColumn("elapsed,", table_column=whole()),
        TimeRemainingColumn(table_column=whole()),
        TextColumn("left", table_column=whole()),
        transient=True,
    )
