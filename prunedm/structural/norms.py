"""Per-channel gates on the outputs of LayerNorm / GroupNorm / RMSNorm layers (EcoDiff's norm option):
where a gated channel can be physically removed, and how its gate is folded in where it cannot.

A norm's output channel is removed only where its sole readers are Linear layers taking it as an input
column, which this module knows for diffusers' `BasicTransformerBlock` with plain `layer_norm` (UNet2D-
ConditionModel's transformers): norm1 -> attn1's to_q/to_k/to_v (self-attention), norm2 -> attn2's to_q
(cross-attention), norm3 -> the FeedForward's first projection. There the closed channels leave those
layers' columns (open gate values are folded into the kept columns) and the norm becomes
`ChannelSelectedNorm`, which normalizes over all channels as before and hands on only the kept ones.

Everywhere else the gate is only a mask, folded into the norm's elementwise affine (weight and bias
times the gate; a norm without one gets a weight equal to the gate): the closed channels output exact
zeros but nothing is removed. This covers norms whose output is modulated before use (adaLN: DiT, SD3,
Flux `norm2`, where shift makes a closed channel nonzero again), norms of the residual stream (a channel
of it cannot go without slicing every block that reads or writes the stream), per-head-dim q/k norms
(RoPE pairs dimensions and the attention scale depends on head_dim), and GroupNorm (its statistics mix
the channels of a group)."""

from __future__ import annotations

import torch
from torch import nn

from prunedm import serialization
from prunedm.structural.layout import (
    StructuralLayout,
    _is_attention,
    _is_feed_forward,
    _keep_columns,
    _set_submodule,
)

NORM_CLASSES = ("LayerNorm", "GroupNorm", "RMSNorm")


def is_gateable_norm(module: nn.Module) -> bool:
    """Whether the module is a LayerNorm, GroupNorm or RMSNorm (torch's or diffusers'), whose output
    channels norm gates can scale."""
    return type(module).__name__ in NORM_CLASSES and norm_channels(module) is not None


def norm_channels(module: nn.Module) -> int | None:
    """The number of output channels of a LayerNorm/RMSNorm (last normalized dim) or GroupNorm."""
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        shape = getattr(module, "dim", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) > 0:
        return int(shape[-1])
    return None


def _direct_readers(model: nn.Module, name: str) -> list[nn.Linear]:
    """The Linear layers that read this norm's output directly and nothing else does, or [] when that
    is not known (see the module doc)."""
    owner_name, _, attr = name.rpartition(".")
    if not owner_name:
        return []
    block = model.get_submodule(owner_name)
    if type(block).__name__ != "BasicTransformerBlock" or getattr(block, "norm_type", None) != "layer_norm":
        return []
    if getattr(block, "pos_embed", None) is not None:  # it reads the norm output before the attention
        return []
    if attr == "norm3":
        ff = getattr(block, "ff", None)
        return [ff.net[0].proj] if _is_feed_forward(ff) else []
    attn = getattr(block, {"norm1": "attn1", "norm2": "attn2"}.get(attr, ""), None)
    if not _is_attention(attn) or getattr(attn, "fused_projections", False):
        return []
    if attn.residual_connection or attn.group_norm is not None or attn.spatial_norm is not None:
        return []  # these read the norm output too
    if attr == "norm2":
        return [attn.to_q] if attn.is_cross_attention else []
    if getattr(block, "only_cross_attention", False):
        return [attn.to_q]  # key and value come from encoder_hidden_states
    return [attn.to_q, attn.to_k, attn.to_v]


def norm_layout(model: nn.Module, name: str) -> StructuralLayout:
    """The gate layout of the norm called `name`: one gate per output channel; out_layers are the
    Linear readers whose input columns go with removed channels ([] where the gate is only a mask)."""
    module = model.get_submodule(name)
    if not is_gateable_norm(module):
        raise ValueError(f"{name!r} is a {type(module).__name__}, not a LayerNorm, GroupNorm or RMSNorm")
    readers = _direct_readers(model, name)
    channels = norm_channels(module)
    if any(layer.in_features != channels for layer in readers):
        readers = []
    channel_dim = 1 if isinstance(module, nn.GroupNorm) else -1
    return StructuralLayout("norm", channels, 1, [], readers, channel_dim=channel_dim)


class ChannelSelectedNorm(nn.Module):
    """A norm computed over all its channels, of whose output only the `kept` channels go on."""

    def __init__(self, norm: nn.Module | None = None, kept: torch.Tensor | None = None, channel_dim: int = -1):
        super().__init__()
        self.norm = norm
        self.channel_dim = int(channel_dim)
        self.register_buffer("kept", torch.zeros(0, dtype=torch.long) if kept is None else kept.long().clone())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.norm(hidden_states, *args, **kwargs)
        return out.index_select(self.channel_dim, self.kept.to(out.device))


def _rebuild_channel_selected_norm(description: dict, current: nn.Module) -> ChannelSelectedNorm:
    # `kept` comes from a file: a count no larger than the norm's channels, and the buffer stays on the
    # meta device (load_pretrained fills it from the weights), so no claimed size is ever allocated.
    kept, channels = description.get("kept"), norm_channels(current)
    if not isinstance(kept, int) or isinstance(kept, bool) or channels is None or not 0 <= kept <= channels:
        kind = type(current).__name__
        raise ValueError(f'"kept" must be a channel count in [0, {channels}] for this {kind}, got {kept!r}')
    return ChannelSelectedNorm(current, torch.empty(kept, dtype=torch.long, device="meta"))


serialization.register_structure_hook(
    "ChannelSelectedNorm", lambda module: {"kept": int(module.kept.numel())}, _rebuild_channel_selected_norm
)


@torch.no_grad()
def _fold_into_affine(norm: nn.Module, gate: torch.Tensor) -> None:
    weight = getattr(norm, "weight", None)
    if weight is None:
        norm.weight = nn.Parameter(gate.clone())
        for flag in ("elementwise_affine", "affine"):
            if hasattr(norm, flag):
                setattr(norm, flag, True)
    else:
        norm.weight = nn.Parameter(weight * gate.to(weight), requires_grad=weight.requires_grad)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        norm.bias = nn.Parameter(bias * gate.to(bias), requires_grad=bias.requires_grad)


def prune_norm_channels(model: nn.Module, name: str, layout: StructuralLayout, mask: torch.Tensor) -> bool:
    """Apply one norm's channel mask (bool keep, or gate values in [0, 1]) in place; True when channels
    were physically removed, False when the gate was only folded into the norm (see the module doc)."""
    norm = model.get_submodule(name)
    gate = mask.float()
    if bool((gate == 1).all()):
        return False
    if not layout.out_layers:
        device = next((p.device for p in norm.parameters()), gate.device)
        _fold_into_affine(norm, gate.to(device))
        return False
    keep = gate != 0
    kept = keep.nonzero().flatten()
    scale = None if bool((gate[keep] == 1).all()) else gate[keep]
    for layer in layout.out_layers:
        device = layer.weight.device
        _keep_columns(layer, kept.to(device), None if scale is None else scale.to(device))
    if keep.all():
        return False
    _set_submodule(model, name, ChannelSelectedNorm(norm, kept, layout.channel_dim))
    return True
