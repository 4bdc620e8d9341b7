"""Sharded training (FSDP2, DTensor, torch.distributed.checkpoint) for the mask learners; see fsdp.py and
checkpoint.py. `ddp` (every rank holds everything) stays the default; `fsdp` shards model, logits and
optimizer state across ranks."""

from __future__ import annotations

PARALLEL_MODES = ("ddp", "fsdp")
