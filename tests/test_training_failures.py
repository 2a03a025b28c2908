"""Training that failed says so: a loss that explodes without becoming NaN stops the run."""

from __future__ import annotations

import pytest

from finetune.errors import FinetuneError
from finetune.run import train


def test_a_finite_but_exploding_loss_stops_the_run_naming_the_learning_rate(make_cfg, tmp_path):
    cfg = make_cfg("strategy=full", "augment=none", "optim.optimizer.lr=50", "trainer.max_epochs=3")
    with pytest.raises(FinetuneError) as stopped:
        train(cfg)
    message = str(stopped.value)
    assert message.startswith("Training diverged: the mean training loss of epoch")
    assert "optim.optimizer.lr=50" in message and "though finite" in message
    assert not (tmp_path / "run" / "metrics.json").exists()
