"""The project's claims on real data, with default settings (slow: minutes per run on a CPU).

Run with `pytest -m slow`. Needs ../shared/data/hymenoptera_data.
"""

import json

import pytest

from conftest import SHARED_DATA, run_train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SHARED_DATA / "hymenoptera_data").is_dir(),
        reason="needs ../shared/data/hymenoptera_data",
    ),
]


def hymenoptera_run(tmp_path, strategy: str) -> dict:
    run_dir = tmp_path / strategy
    result = run_train(
        "data=hymenoptera",
        f"paths.data_root={SHARED_DATA}",
        "model=efficientnet_lite0",
        f"strategy={strategy}",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={run_dir}",
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def test_last_layer_reaches_093_on_hymenoptera(tmp_path):
    assert hymenoptera_run(tmp_path, "last_layer")["val/acc"] >= 0.93


def test_full_reaches_094_on_hymenoptera(tmp_path):
    assert hymenoptera_run(tmp_path, "full")["val/acc"] >= 0.94


def test_fine_tuning_beats_training_from_scratch(tmp_path):
    scratch = hymenoptera_run(tmp_path, "scratch")
    assert scratch["weights"] is None
    assert scratch["val/acc"] < 0.85
