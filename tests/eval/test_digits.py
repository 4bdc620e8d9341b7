"""The offline dataset and the digits classifier."""

from __future__ import annotations

import pytest
import torch

from prunedm.data import DigitsDataset
from prunedm.eval import DigitsClassifier, accuracy


def test_digits_splits_are_disjoint_and_scaled():
    train, test, everything = DigitsDataset("train"), DigitsDataset("test"), DigitsDataset("all")
    assert len(train) + len(test) == len(everything) == 1797
    assert train[0][0].shape == (1, 16, 16)
    assert train.images.min() == -1 and train.images.max() == 1
    flat = lambda d: {tuple(x.flatten().tolist()) for x in d.images[:200]}  # noqa: E731
    assert not flat(train) & flat(test)
    assert DigitsDataset("test", size=32)[0][0].shape == (1, 32, 32)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        DigitsDataset("validation")
    with pytest.raises(ValueError, match="size must be >= 8"):
        DigitsDataset(size=4)


def test_classifier_save_load_round_trip(tmp_path):
    model = DigitsClassifier().eval()
    images = DigitsDataset("test").images[:8]
    model.save(tmp_path / "clf")
    loaded = DigitsClassifier.load(tmp_path / "clf")
    assert torch.equal(loaded(images), model(images))
    assert loaded.features(images).shape == (8, 64)
    assert 0.0 <= accuracy(loaded, images, torch.zeros(8, dtype=torch.long)) <= 1.0
    (tmp_path / "clf" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a DigitsClassifier checkpoint"):
        DigitsClassifier.load(tmp_path / "clf")
