"""A run dir written by the project before its config gained keys (data.folds, data.fold,
data.max_image_pixels) still loads and still resumes: tests/fixtures/run_made_before_0_2 is one
epoch of `strategy=full` on the synthetic set with timm's tiny test network, written at commit
71e23ce (its paths under /tmp/oldrun, moved here by the test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import REPO, run_train
from finetune.module import load_classifier

FIXTURE = REPO / "tests" / "fixtures" / "run_made_before_0_2"
WRITTEN_UNDER = "/tmp/oldrun"


def moved_run(tmp_path: Path) -> Path:
    """The fixture's run dir copied under `tmp_path`, its saved paths pointing there."""
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    for name in ("config.yaml", ".hydra/overrides.yaml", "split.json"):
        text = (run_dir / name).read_text().replace(f"{WRITTEN_UNDER}/run", str(run_dir))
        (run_dir / name).write_text(text.replace(WRITTEN_UNDER, str(tmp_path)))
    return run_dir


def test_a_checkpoint_of_an_earlier_version_loads_and_predicts():
    module = load_classifier(FIXTURE / "checkpoints" / "last.ckpt")
    assert module.class_names == json.loads((FIXTURE / "classes.json").read_text())
    crop = module.network.input_spec.crop_size
    with torch.no_grad():
        logits = module(torch.zeros(2, 3, crop, crop))
    assert logits.shape == (2, len(module.class_names)) and torch.isfinite(logits).all()


def test_a_run_of_an_earlier_version_resumes_with_the_new_keys_at_their_defaults(tmp_path):
    run_dir = moved_run(tmp_path)
    result = run_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_epochs=2")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    added = ("data.folds", "data.fold", "data.max_image_pixels", "data.class_weights")
    for key in (*added, "data.sampler"):
        assert f"key {key} was not in the run's saved config; it takes its default" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2
