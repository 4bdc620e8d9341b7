"""Where head, FFN-unit and norm-channel gates attach (StructuralLayout) and the slicing both removals use:
the shared base of structural.heads and structural.norms, so neither imports the other's definitions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StructuralLayout:
    """How gates attach to one attention, FFN or norm: `units` gates (heads, hidden units, channels),
    each covering `group` consecutive input columns of every layer in `out_layers`, starting at column
    `out_offset` (a Flux single-stream block's proj_out reads [attention ; MLP]), and rows of every
    layer in `in_layers` (a GLU projection holds each unit twice: `glu`); `params_per_unit` is what
    removing one unit saves. Norm layouts ("norm") gate the norm's output channels (`channel_dim`):
    their `out_layers` are the Linear layers reading that output directly, empty when the channel
    cannot be removed and the gate is only folded into the norm (prunedm.structural.norms)."""

    kind: str  # "heads", "ffn" or "norm"
    units: int
    group: int
    in_layers: list[nn.Linear]
    out_layers: list[nn.Linear]
    glu: bool = False
    out_offset: int = 0
    channel_dim: int = -1

    @property
    def params_per_unit(self) -> int:
        rows = sum(layer.in_features + (layer.bias is not None) for layer in self.in_layers)
        cols = sum(layer.out_features for layer in self.out_layers)
        return max(self.group * (rows * (2 if self.glu else 1) + cols), 1)


def _is_attention(module: nn.Module) -> bool:
    return isinstance(getattr(module, "to_q", None), nn.Linear) and isinstance(getattr(module, "heads", None), int)


def _is_feed_forward(module: nn.Module) -> bool:
    net = getattr(module, "net", None)
    return (
        type(module).__name__ == "FeedForward"
        and isinstance(net, nn.ModuleList)
        and len(net) >= 3
        and isinstance(getattr(net[0], "proj", None), nn.Linear)
        and isinstance(net[2], nn.Linear)
    )


@torch.no_grad()
def _keep_columns(layer: nn.Linear, columns: torch.Tensor, scale: torch.Tensor | None) -> None:
    weight = layer.weight[:, columns]
    if scale is not None:
        weight = weight * scale.to(weight.dtype)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    layer.in_features = int(columns.numel())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    parent = model.get_submodule(owner)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)
