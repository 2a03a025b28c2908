"""predict.py embeddings=true: one vector per image, row-aligned with predictions.csv, from
what the head sees (or a named block, pooled)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_csv, real_photos, run_entry
from finetune.data import load_rgb
from finetune.embeddings import pooled
from finetune.errors import FinetuneError
from finetune.predict import load_predictor


def test_embeddings_are_what_the_head_sees_row_aligned_with_the_csv(lite0_run, tmp_path):
    photos = tmp_path / "photos"
    real_photos(photos)
    (photos / "ants" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped: no row in either
    out = tmp_path / "out"
    result = run_entry(
        "predict.py",
        f"ckpt={lite0_run}",
        f"inputs={photos}",
        "embeddings=true",
        "batch_size=4",  # several batches: rows stay in order across them
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "predictions.csv")
    vectors = np.load(out / "embeddings.npy")
    predictor = load_predictor(lite0_run, device="cpu")
    network = predictor.model.network
    assert vectors.shape == (len(rows), network.num_features) == (6, 1280)
    assert vectors.dtype == np.float32
    images = torch.stack([predictor.transform(load_rgb(row["path"])) for row in rows])
    with torch.inference_mode():
        logits = predictor.model(images)
        features = network.forward_features(images)
        from_vectors = network.forward_head(torch.from_numpy(vectors))
    # row i is the image of CSV row i: the head on it gives that image's logits
    torch.testing.assert_close(from_vectors, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(vectors), features, atol=1e-5, rtol=0)
    probabilities = (logits / predictor.temperature).softmax(dim=1)
    for row, expected in zip(rows, probabilities, strict=True):
        assert float(row["score_1"]) == pytest.approx(float(expected.max()), abs=1e-5)


def test_embeddings_equal_the_feature_cache_of_the_same_images(lite0_run):
    """The linear probe of the run trained on cached features of its frozen backbone: the
    embeddings of its val images are those vectors."""
    metrics = json.loads((lite0_run / "metrics.json").read_text())
    assert metrics["feature_cache"] in ("miss", "hit")
    cached = torch.load(metrics["feature_cache_file"], weights_only=True)["features"]["val"]
    split = json.loads((lite0_run / "split.json").read_text())
    files = [Path(split["root"]) / p for paths in split["files"]["val"].values() for p in paths]
    result = load_predictor(lite0_run, device="cpu").predict(files, embeddings=True)
    assert result.embeddings.shape == cached.shape
    # the cache is in the split's order: each image's vector is one cached row, one for one
    distances = torch.cdist(result.embeddings, cached)
    nearest = distances.argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(len(cached)))
    # float32 rounding of the convolutions differs with the batch's size (8 there, 2 here)
    torch.testing.assert_close(result.embeddings, cached[nearest], atol=1e-4, rtol=1e-4)


def test_a_named_block_gives_its_pooled_output_and_an_unknown_one_is_refused(lite0_run, tmp_path):
    files = real_photos(tmp_path, per_class=1, class_folders=False)
    predictor = load_predictor(lite0_run, device="cpu")
    result = predictor.predict(files, embeddings=True, layer="blocks.5")
    block = predictor.model.network.net.get_submodule("blocks.5")
    outputs = []
    hook = block.register_forward_hook(lambda _m, _i, output: outputs.append(output))
    images = torch.stack([predictor.transform(load_rgb(str(f))) for f in files])
    with torch.inference_mode():
        predictor.model(images)
    hook.remove()
    assert outputs[0].ndim == 4  # (N, C, H, W): averaged over H and W
    torch.testing.assert_close(result.embeddings, outputs[0].mean(dim=(2, 3)), atol=1e-5, rtol=0)
    assert result.embeddings.shape == (2, outputs[0].shape[1])
    tokens = torch.arange(24.0).view(2, 3, 4)  # a transformer's (N, tokens, C)
    torch.testing.assert_close(pooled(tokens), tokens.mean(dim=1))
    with pytest.raises(FinetuneError, match=r"no module 'blocks\.99'.*blocks\.5"):
        predictor.predict(files, embeddings=True, layer="blocks.99")
