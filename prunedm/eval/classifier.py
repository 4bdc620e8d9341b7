"""A small CNN trained on the digits: the feature extractor of the offline FID and the judge of
generated samples' classes. Weights ship as safetensors with a JSON config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunedm._atomic import atomic_dir

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    def __init__(self, size: int = 16, width: int = 32):
        super().__init__()
        self.config = {"size": size, "width": width}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, FEATURE_DIM), nn.GELU(),
        )  # fmt: skip
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], [N, 1, size, size]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save(self, path: str | Path) -> None:
        """Write path/{model.safetensors, config.json}, the directory whole or not at all."""
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(self.config))

    @classmethod
    def load(cls, path: str | Path) -> DigitsClassifier:
        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
            model = cls(**config)
            model.load_state_dict(load_file(str(path / "model.safetensors")))
        except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as exc:
            raise ValueError(f"{path}: not a DigitsClassifier checkpoint ({exc})") from exc
        return model.eval()


def train_classifier(train, test, epochs: int = 8, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on `train` (a DigitsDataset); returns the model and its test accuracy."""
    torch.manual_seed(seed)
    model = DigitsClassifier(size=train.size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=gen).split(64):
            images = train.images[idx]
            images = images + 0.05 * torch.randn(images.shape, generator=gen)  # robust to sampler noise
            loss = F.cross_entropy(model(images), train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), accuracy(model, test.images, test.labels)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(images).argmax(1) == labels).float().mean())
