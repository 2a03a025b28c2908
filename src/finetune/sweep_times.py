"""Fit seconds in a sweep summary, told apart by the feature cache of each run.

A run that solves the linear probe on cached features extracts them once (a cache `miss`: the
backbone's forward pass over the training and validation images, minutes on a large split) or
reads them (a `hit`: seconds). The first seed of a sweep usually extracts and the others read,
so a mean of their fit seconds is neither time: the summary lists each run's cache state next
to its time and averages the time per state.
"""

from __future__ import annotations

import statistics
from typing import Any

# A run's state (`cache_state`), in the order the summary lists them: `miss` (it extracted
# features: its fit seconds count the extraction), `hit` (it read every feature from the
# cache), `off` (no cached features); "" for a run that did not record it.
CACHE_STATES = ("miss", "hit", "off", "")
UNRECORDED = "unrecorded"

NOTE = (
    "Fit seconds of a run marked `miss` under feature cache count the extraction of the "
    "backbone's features (minutes on a large split); a `hit` read them from the cache "
    "(seconds). Compare times within one state: the mean table averages them per state."
)


def cache_state(metrics: dict[str, Any]) -> str:
    """The feature cache of a run from its metrics.json: `feature_cache`, and `views_cache`
    for the features of augmented views (a miss of either is a miss); "" when unrecorded."""
    states = {metrics.get("feature_cache"), metrics.get("views_cache")}
    return next((state for state in CACHE_STATES if state in states), "")


def seconds_by_cache(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The fit seconds of finished `runs` (summary rows) per cache state, in CACHE_STATES
    order: state -> {"mean", "std", "runs"}."""
    times: dict[str, list[float]] = {}
    for run in runs:
        if run.get("fit_seconds") is not None:
            times.setdefault(run.get("feature_cache") or "", []).append(run["fit_seconds"])
    return {
        state: {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": len(values),
        }
        for state in CACHE_STATES
        if (values := times.get(state))
    }


def states_cell(by_cache: dict[str, dict[str, float]]) -> str:
    """The cache state of a group of runs: `hit`, or for a mix `1 miss, 2 hit`."""
    if len(by_cache) == 1:
        return next(iter(by_cache))
    return ", ".join(f"{times['runs']} {state or UNRECORDED}" for state, times in by_cache.items())


def seconds_cell(by_cache: dict[str, dict[str, float]]) -> str:
    """Mean +- std of fit seconds per state, for a group whose runs mix them:
    `miss 95.0 +- 0.0 (1); hit 2.1 +- 0.3 (2)`."""
    return "; ".join(
        f"{state or UNRECORDED} {times['mean']:.1f} +- {times['std']:.1f} ({times['runs']})"
        for state, times in by_cache.items()
    )


def mixes_states(rows: list[dict[str, Any]]) -> bool:
    """Whether finished runs of the sweep both extracted features and read them."""
    return {"miss", "hit"} <= {row.get("feature_cache") for row in rows if row["status"] == "ok"}
