"""Depth pruning of diffusion transformers: remove whole blocks from `transformer_blocks`, and the
baselines that choose which (every k-th, a given list, ShortGPT's Block Influence).

The learned choice (TinyFusion) lives in prunedm.pruning.tinyfusion. Note on DiT: diffusers' DiT
conditions its output head on `transformer_blocks[0].norm1.emb`; converted DiT checkpoints hold
identical copies of that embedder in every block, so removing block 0 leaves the output unchanged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DepthPruningReport:
    """Which blocks prune_depth kept (indices into the original list) and what that saved."""

    kept: list[int]
    removed: list[int]
    params_before: int
    params_after: int

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before


def transformer_blocks(model: nn.Module, blocks_attr: str = "transformer_blocks") -> nn.ModuleList:
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no ModuleList named {blocks_attr!r} to prune")
    return blocks


def prune_depth(
    model: nn.Module,
    keep_indices: Iterable[int],
    blocks_attr: str = "transformer_blocks",
    config_key: str | None = "num_layers",
) -> DepthPruningReport:
    """Keep only the blocks at `keep_indices` (in their original order), in place.

    The block list is replaced by a shorter ModuleList and `config[config_key]` (num_layers for
    DiT, PixArt, SD3) is set to the new count, so the config keeps describing the model."""
    blocks = transformer_blocks(model, blocks_attr)
    keep = sorted(set(int(i) for i in keep_indices))
    if not keep:
        raise ValueError("keep_indices is empty: a model needs at least one block")
    if keep[0] < 0 or keep[-1] >= len(blocks):
        raise ValueError(f"keep_indices must lie in [0, {len(blocks)}), got {keep}")
    params_before = sum(p.numel() for p in model.parameters())
    removed = [i for i in range(len(blocks)) if i not in keep]
    setattr(model, blocks_attr, nn.ModuleList([blocks[i] for i in keep]))
    config = getattr(model, "config", None)
    if config_key and config is not None and config_key in config:
        model.register_to_config(**{config_key: len(keep)})
    return DepthPruningReport(keep, removed, params_before, sum(p.numel() for p in model.parameters()))


def keep_every(num_blocks: int, k: int, offset: int = 0) -> list[int]:
    """Indices offset, offset + k, offset + 2k, ... below num_blocks (k=2: half the blocks)."""
    if k < 1 or not 0 <= offset < k:
        raise ValueError(f"need k >= 1 and 0 <= offset < k, got k={k}, offset={offset}")
    return list(range(offset, num_blocks, k))


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def block_influence(
    model: nn.Module,
    inputs: Mapping | Sequence[Mapping],
    blocks_attr: str = "transformer_blocks",
) -> torch.Tensor:
    """Block Influence (ShortGPT): 1 - cos(block input, block output), averaged over tokens and batches.

    `inputs` are forward kwargs for the model (one dict or a list of them). A block that barely
    changes its input scores near 0 and is the first to remove."""
    blocks = transformer_blocks(model, blocks_attr)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def hook(index):
        def record(module, args, kwargs, output):
            x, y = _block_input(args, kwargs), _block_output(output)
            cos = F.cosine_similarity(x.flatten(0, -2).double(), y.flatten(0, -2).double(), dim=-1)
            totals[index] += (1 - cos).sum().cpu()
            counts[index] += cos.numel()

        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for kwargs in [inputs] if isinstance(inputs, Mapping) else inputs:
            model(**kwargs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return (totals / counts.clamp(min=1)).float()


def keep_most_influential(scores: torch.Tensor, num_keep: int) -> list[int]:
    """The num_keep blocks with the highest Block Influence, in model order."""
    if not 0 < num_keep <= len(scores):
        raise ValueError(f"num_keep must be in [1, {len(scores)}], got {num_keep}")
    return sorted(torch.topk(scores, num_keep).indices.tolist())
