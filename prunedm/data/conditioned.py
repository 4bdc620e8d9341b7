"""Training images with their conditioning: each image's row in a table of conditions (a text embedding per
distinct caption, or a class label), indexed together as one batch dict."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class ConditionedImages(Dataset):
    """{"images": images[i], key: table[ids[i]]} for an int or a tensor of indices i: finetune's dataset items
    and the mask learners' batches. The table holds each distinct condition once (captions repeat)."""

    def __init__(self, images: torch.Tensor, key: str, table: torch.Tensor, ids: torch.Tensor):
        if len(ids) != len(images):
            raise ValueError(f"ConditionedImages: {len(images)} images but {len(ids)} condition ids")
        self.images, self.key, self.table, self.ids = images, key, table, ids.long()

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> ConditionedImages:
        return ConditionedImages(self.images.to(device), self.key, self.table.to(device), self.ids.to(device))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return {"images": self.images[index], self.key: self.table[self.ids[index]]}
