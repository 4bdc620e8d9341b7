"""Training images with their conditioning: each image's row in a table of conditions (a text embedding per
distinct caption, or a class label; for an MMDiT several tables, e.g. embeddings and pooled projections),
indexed together as one batch dict."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class ConditionedImages(Dataset):
    """{"images": images[i], key: table[ids[i]]} for an int or a tensor of indices i: finetune's dataset items
    and the mask learners' batches. The table holds each distinct condition once (captions repeat); `key` and
    `table` may be tuples of keys and tables with one row per distinct condition each."""

    def __init__(self, images: torch.Tensor, key, table, ids: torch.Tensor):
        if len(ids) != len(images):
            raise ValueError(f"ConditionedImages: {len(images)} images but {len(ids)} condition ids")
        keys, tables = (key, tuple(table)) if isinstance(key, tuple) else ((key,), (table,))
        if len(keys) != len(tables) or len({len(t) for t in tables}) != 1:
            raise ValueError(f"ConditionedImages: keys {keys} need one table each, all with one row per condition")
        self.images, self.key, self.table, self.ids = images, key, table, ids.long()
        self._tables = dict(zip(keys, tables))

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> ConditionedImages:
        table = tuple(t.to(device) for t in self.table) if isinstance(self.key, tuple) else self.table.to(device)
        return ConditionedImages(self.images.to(device), self.key, table, self.ids.to(device))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        rows = self.ids[index]
        return {"images": self.images[index], **{k: t[rows] for k, t in self._tables.items()}}
