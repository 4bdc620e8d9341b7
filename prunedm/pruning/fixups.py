"""Bring diffusers modules' static attributes (channels, out_channels, attention dims) back in line with
their resized layers after channel pruning, so forward asserts and later readers see the real widths."""

from __future__ import annotations

from torch import nn


def sync_diffusers_attributes(model: nn.Module) -> list[str]:
    """Update channel attributes of diffusers blocks from their layers; returns the modules changed.

    Attention keeps its `heads` and its `scale`: pruning removes the same dims from every head, and
    the softmax temperature of the trained model is what the remaining dims were trained with."""
    changed = []
    for name, module in model.named_modules():
        updates = _attribute_updates(module)
        updates = {k: v for k, v in updates.items() if getattr(module, k, None) != v}
        for key, value in updates.items():
            setattr(module, key, value)
        if updates:
            changed.append(name)
    return changed


def _attribute_updates(module: nn.Module) -> dict:
    kind = type(module).__name__
    conv = getattr(module, "conv", None)
    if kind in ("Upsample2D", "Downsample2D", "Upsample1D", "Downsample1D") and isinstance(
        conv, nn.modules.conv._ConvNd
    ):
        return {"channels": conv.in_channels, "out_channels": conv.out_channels}
    if kind in ("ResnetBlock2D", "ResnetBlockCondNorm2D") and hasattr(module, "conv1"):
        return {"in_channels": module.conv1.in_channels, "out_channels": module.conv2.out_channels}
    if kind in ("Attention", "AttentionModuleMixin") and hasattr(module, "to_q"):
        updates = {"query_dim": module.to_q.in_features, "inner_dim": module.to_q.out_features}
        if getattr(module, "to_k", None) is not None:
            updates["inner_kv_dim"] = module.to_k.out_features
            updates["cross_attention_dim"] = module.to_k.in_features
        if getattr(module, "to_out", None) is not None and isinstance(module.to_out[0], nn.Linear):
            updates["out_dim"] = module.to_out[0].out_features
        return updates
    if kind == "Transformer2DModel" and isinstance(getattr(module, "proj_in", None), (nn.Linear, nn.Conv2d)):
        proj_in, proj_out = module.proj_in, module.proj_out
        return {
            "in_channels": _width(proj_in, "in"),
            "inner_dim": _width(proj_in, "out"),
            "out_channels": _width(proj_out, "out"),
        }
    return {}


def _width(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features if side == "in" else layer.out_features
    return layer.in_channels if side == "in" else layer.out_channels
