"""The shipped small models (prunedm/assets, made by scripts/train_digits_models.py) load and work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2] / "prunedm" / "assets"
pytestmark = pytest.mark.skipif(not (ASSETS / "digits-ddpm" / "config.json").exists(), reason="assets not trained yet")


def test_digits_classifier_is_accurate():
    from prunedm.data import DigitsDataset
    from prunedm.eval import DigitsClassifier, accuracy

    test = DigitsDataset("test")
    assert accuracy(DigitsClassifier.load(ASSETS / "digits-classifier"), test.images, test.labels) > 0.95


def test_digits_ddpm_loads_offline_and_denoises():
    from diffusers import DDPMScheduler, UNet2DModel

    model = UNet2DModel.from_pretrained(ASSETS / "digits-ddpm").eval()
    info = json.loads((ASSETS / "digits-ddpm" / "training.json").read_text())
    assert info["steps"] > 0
    from prunedm.data import DigitsDataset

    images = DigitsDataset("test").images[:32]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=gen)
    t = torch.full((32,), 300)
    with torch.no_grad():
        predicted = model(scheduler.add_noise(images, noise, t), t).sample
    # A trained model predicts the noise far better than predicting zero (MSE 1.0).
    assert torch.mean((predicted - noise) ** 2) < 0.3
