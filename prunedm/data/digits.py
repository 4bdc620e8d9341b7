"""scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package), upsampled and
scaled to [-1, 1]: the offline stand-in for CIFAR-10 in the quality benchmark and the demo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2


class DigitsDataset(Dataset):
    """(image [1, size, size] in [-1, 1], label) pairs; a fixed 80/20 train/test split by seed 0."""

    def __init__(self, split: str = "train", size: int = 16):
        if split not in SPLITS:
            raise ValueError(f"DigitsDataset: split must be one of {SPLITS}, got {split!r}")
        if size < 8:
            raise ValueError(f"DigitsDataset: size must be >= 8 (the images are 8x8), got {size}")
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp(0, 1) * 2 - 1
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        n_test = int(len(images) * TEST_FRACTION)
        pick = {"test": order[:n_test], "train": order[n_test:], "all": order}[split]
        self.images, self.labels, self.size = images[pick].contiguous(), labels[pick].contiguous(), size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
