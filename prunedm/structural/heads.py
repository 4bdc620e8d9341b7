"""Physical removal of attention heads and FFN hidden units from diffusers transformers: slice the
projections of what a head/unit mask drops, and swap sub-layers and blocks left with nothing to compute.

What a fully pruned part computes. Head and unit gates act on the input of the output projection
(`to_out[0]`, `to_add_out`, `ff.net[2]`), so with every head or unit gated off that projection still
adds its bias. An attention with no heads left becomes `PrunedAttention` and an FFN with no units
`PrunedFeedForward`: each returns its output bias (zeros without one), exactly what the gated layer
gave. A diffusers `BasicTransformerBlock` (DiT, the transformers inside UNet2DConditionModel) whose
attentions and FFN are all fully pruned becomes `ResidualBlock`, which computes what such a block still
computes (ada_norm, ada_norm_continuous and i2vgen blocks as layer_norm; other kinds keep their block):

    h + b_attn1 + b_attn2 + b_ff                           (layer_norm blocks: UNet2DConditionModel)
    h + gate_msa(t, y) * b_attn1 + b_attn2 + gate_mlp(t, y) * b_ff      (ada_norm_zero blocks: DiT)

with b the output biases of the removed layers (absent for bias-free layers) and the adaLN-Zero gates
from the block's own `norm1`. It is the identity on hidden_states exactly when those layers have no
bias. For DiT it keeps `norm1`, whose `emb` the model reads from block 0 for its output head. Joint
blocks (SD3, Flux) keep their block, with PrunedAttention / PrunedFeedForward inside.

Flux single-stream blocks have no attention output projection: their head gates and MLP unit gates
scale the two column ranges of `proj_out`, which reads [attention output ; MLP activation]. Emptied,
the attention becomes a PrunedAttention with a zero-width output and proj_mlp a Linear with no rows;
proj_out loses their columns, and with both gone computes residual + gate * its bias, as gated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from prunedm import serialization
from prunedm.structural import norms
from prunedm.structural.layout import (
    StructuralLayout,
    _is_attention,
    _is_feed_forward,
    _keep_columns,
    _set_submodule,
)

# Norm types of BasicTransformerBlock whose fully pruned form ResidualBlock reproduces exactly.
_CONSTANT_NORMS = ("layer_norm", "layer_norm_i2vgen", "ada_norm", "ada_norm_continuous")
_RESIDUAL_NORMS = (*_CONSTANT_NORMS, "ada_norm_zero")


def _norm_width(norm: nn.Module | None) -> int | None:
    shape = getattr(norm, "normalized_shape", None)
    if shape is None:
        shape = getattr(norm, "dim", None)
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) > 0:
        return int(shape[-1])
    return None


def is_structural_candidate(module: nn.Module) -> bool:
    """Whether the module is an attention (to_q, heads) or a diffusers FeedForward: what gates look for."""
    return _is_attention(module) or _is_feed_forward(module)


def structural_layout(module: nn.Module) -> StructuralLayout | str:
    """The gate layout of a diffusers attention (per head) or FeedForward (per hidden unit), or the
    reason (a string) why this module cannot take structural gates."""
    if _is_feed_forward(module):
        proj, out = module.net[0].proj, module.net[2]
        hidden = out.in_features
        if proj.out_features not in (hidden, 2 * hidden):
            return f"FFN projection has {proj.out_features} outputs for {hidden} hidden units"
        return StructuralLayout("ffn", hidden, 1, [proj], [out], glu=proj.out_features == 2 * hidden)
    if not _is_attention(module):
        return "neither an attention (to_q, heads) nor a diffusers FeedForward"
    if getattr(module, "fused_projections", False):
        return "fused QKV projections (unfuse them first)"
    to_out = getattr(module, "to_out", None)
    if not isinstance(to_out, nn.ModuleList) or not to_out or not isinstance(to_out[0], nn.Linear):
        return "no to_out projection (pre_only attention, e.g. Flux single-stream blocks)"
    heads, inner = module.heads, module.to_q.out_features
    if heads < 1 or inner % heads:
        return f"{inner} query features do not split into {heads} heads"
    head_dim = inner // heads
    in_layers = [module.to_q]
    for name in ("to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        layer = getattr(module, name, None)
        if layer is None:
            continue
        if not isinstance(layer, nn.Linear) or layer.out_features != inner:
            return f"{name} has {getattr(layer, 'out_features', '?')} outputs, not {inner} (grouped KV heads?)"
        in_layers.append(layer)
    out_layers = [to_out[0]]
    if isinstance(getattr(module, "to_add_out", None), nn.Linear):
        out_layers.append(module.to_add_out)
    for layer in out_layers:
        if layer.in_features != inner:
            return f"output projection takes {layer.in_features} features, not {inner}"
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        width = _norm_width(getattr(module, name, None))
        if width is not None and width != head_dim:
            return f"{name} normalizes {width} features across heads (head_dim is {head_dim})"
    return StructuralLayout("heads", heads, head_dim, in_layers, out_layers)


def _single_stream_layouts(block: nn.Module) -> dict[str, StructuralLayout] | None:
    """Layouts of a Flux-style single-stream block (pre-only `attn` with no output projection, `proj_mlp`
    then the elementwise `act_mlp`, and `proj_out` reading [attention output ; MLP activation]), keyed
    by the block-relative names "attn" (heads) and "proj_mlp" (hidden units); None for other modules."""
    attn, proj_mlp, proj_out = (getattr(block, n, None) for n in ("attn", "proj_mlp", "proj_out"))
    if not (isinstance(proj_mlp, nn.Linear) and isinstance(proj_out, nn.Linear) and hasattr(block, "act_mlp")):
        return None
    if isinstance(attn, PrunedAttention):
        attn_width, head_layout = attn.out_dim, None
    elif _is_attention(attn) and not getattr(attn, "fused_projections", False) and getattr(attn, "pre_only", False):
        heads, inner = attn.heads, attn.to_q.out_features
        if heads < 1 or inner % heads:
            return None
        in_layers = [attn.to_q, attn.to_k, attn.to_v]
        if any(not isinstance(layer, nn.Linear) or layer.out_features != inner for layer in in_layers):
            return None
        for name in ("norm_q", "norm_k"):
            width = _norm_width(getattr(attn, name, None))
            if width is not None and width != inner // heads:
                return None
        attn_width = inner
        head_layout = StructuralLayout("heads", heads, inner // heads, in_layers, [proj_out])
    else:
        return None
    if proj_out.in_features != attn_width + proj_mlp.out_features:
        return None
    layouts = {} if head_layout is None else {"attn": head_layout}
    units = proj_mlp.out_features
    layouts["proj_mlp"] = StructuralLayout("ffn", units, 1, [proj_mlp], [proj_out], out_offset=attn_width)
    return layouts


def structural_layouts(model: nn.Module) -> dict[str, StructuralLayout | str]:
    """{module name: gate layout, or the reason it cannot take gates} for every attention, FeedForward
    and Flux-style single-stream block part (`<block>.attn` heads, `<block>.proj_mlp` units) of the model."""
    out: dict[str, StructuralLayout | str] = {}
    for name, module in model.named_modules():
        single = _single_stream_layouts(module)
        if single is not None:
            out.update({f"{name}.{part}" if name else part: layout for part, layout in single.items()})
        elif is_structural_candidate(module) and name not in out:
            out[name] = structural_layout(module)
    return out


# ---- modules that stand in for removed parts ----


def _bias_copy(layer: nn.Linear | None) -> nn.Parameter | None:
    if layer is None or layer.bias is None:
        return None
    return nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)


class PrunedAttention(nn.Module):
    """An attention with every head removed: its output is the output projection's bias (and, for a
    joint attention, the context projection's), plus the input where the attention was residual."""

    def __init__(self, attention: nn.Module | None = None) -> None:
        super().__init__()
        to_out = getattr(attention, "to_out", None)
        out = to_out[0] if isinstance(to_out, nn.ModuleList) and to_out else None
        add_out = getattr(attention, "to_add_out", None)
        # Registered even when None, so a loader can give them the saved shapes.
        self.register_parameter("bias", _bias_copy(out))
        self.register_parameter("context_bias", _bias_copy(add_out))
        self.out_dim = int(out.out_features) if out is not None else 0
        self.context_dim = int(add_out.out_features) if isinstance(add_out, nn.Linear) else 0
        self.joint = getattr(attention, "added_kv_proj_dim", None) is not None
        self.residual_connection = bool(getattr(attention, "residual_connection", False))
        self.rescale_output_factor = float(getattr(attention, "rescale_output_factor", 1.0))

    def _constant(self, like: torch.Tensor, bias: torch.Tensor | None, width: int, channels_first: bool):
        shape = (*like.shape[:-1], width) if not channels_first else (like.shape[0], width, *like.shape[2:])
        if bias is None:
            return like.new_zeros(shape)
        view = bias.view(1, -1, *([1] * (like.dim() - 2))) if channels_first else bias
        return view.to(like.dtype).expand(shape)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, *args, **kwargs):
        channels_first = hidden_states.dim() == 4  # diffusers attention on [B, C, H, W] feature maps
        out = self._constant(hidden_states, self.bias, self.out_dim, channels_first)
        if self.residual_connection:
            out = out + hidden_states
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        if self.joint and encoder_hidden_states is not None:
            context = None
            if self.context_dim:
                context = self._constant(encoder_hidden_states, self.context_bias, self.context_dim, False)
            return out, context
        return out


class PrunedFeedForward(nn.Module):
    """A diffusers FeedForward with every hidden unit removed: its output is the output layer's bias."""

    def __init__(self, feed_forward: nn.Module | None = None) -> None:
        super().__init__()
        out = feed_forward.net[2] if feed_forward is not None else None
        self.register_parameter("bias", _bias_copy(out))
        self.out_features = int(out.out_features) if out is not None else 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], self.out_features)
        if self.bias is None:
            return hidden_states.new_zeros(shape)
        return self.bias.to(hidden_states.dtype).expand(shape)


class ResidualBlock(nn.Module):
    """What a diffusers BasicTransformerBlock computes once all its heads and FFN units are removed:
    hidden_states plus its leftover output biases, gated by adaLN-Zero for DiT (see the module doc)."""

    def __init__(self, block: nn.Module | None = None, norm1: nn.Module | None = None) -> None:
        super().__init__()
        self.norm_type = str(getattr(block, "norm_type", "layer_norm"))
        if block is not None and self.norm_type == "ada_norm_zero":
            norm1 = block.norm1
        self.norm1 = norm1
        for name, part in (("attn1_bias", "attn1"), ("attn2_bias", "attn2"), ("ff_bias", "ff")):
            self.register_parameter(name, getattr(getattr(block, part, None), "bias", None))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        timestep=None,
        cross_attention_kwargs=None,
        class_labels=None,
        added_cond_kwargs=None,
    ) -> torch.Tensor:
        # Same operations in the same order as BasicTransformerBlock with bias-only sub-layers.
        gate_msa = gate_mlp = None
        if self.norm_type == "ada_norm_zero" and (self.attn1_bias is not None or self.ff_bias is not None):
            _, gate_msa, _, _, gate_mlp = self.norm1(
                hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype
            )
        for bias, gate in ((self.attn1_bias, gate_msa), (self.attn2_bias, None), (self.ff_bias, gate_mlp)):
            if bias is None:
                continue
            term = bias.to(hidden_states.dtype).expand(hidden_states.shape)
            if gate is not None:
                term = gate.unsqueeze(1) * term
            hidden_states = term + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


def _describe_residual_block(module: ResidualBlock) -> dict:
    return {"has_norm1": module.norm1 is not None}


def _rebuild_residual_block(description: dict, current: nn.Module) -> ResidualBlock:
    norm1 = getattr(current, "norm1", None) if description.get("has_norm1") else None
    return ResidualBlock(None, norm1=norm1)


# save_pretrained/load_pretrained rebuild these in place of the modules the config builds there;
# parameter shapes and attributes come from the saved structure.
serialization.register_structure_hook(
    "PrunedAttention", lambda module: {}, lambda description, current: PrunedAttention()
)
serialization.register_structure_hook(
    "PrunedFeedForward", lambda module: {}, lambda description, current: PrunedFeedForward()
)
serialization.register_structure_hook("ResidualBlock", _describe_residual_block, _rebuild_residual_block)


# ---- removal ----


@dataclass
class StructuralPruningReport:
    """What apply_structural_masks removed: heads, FFN units and norm channels before/after, which
    modules became PrunedAttention / PrunedFeedForward (or were sliced to nothing), which blocks became
    ResidualBlock, which norms lost channels or only took their gates in, and parameter counts."""

    heads_before: int = 0
    heads_after: int = 0
    ffn_units_before: int = 0
    ffn_units_after: int = 0
    norm_channels_before: int = 0
    norm_channels_after: int = 0
    emptied: list[str] = field(default_factory=list)
    residual_blocks: list[str] = field(default_factory=list)
    channel_selected_norms: list[str] = field(default_factory=list)  # norms whose closed channels went
    masked_norms: list[str] = field(default_factory=list)  # norms whose gates were only folded in
    params_before: int = 0
    params_after: int = 0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0


@torch.no_grad()
def _keep_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[rows].clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[rows].clone(), requires_grad=layer.bias.requires_grad)
    layer.out_features = int(rows.numel())


def _check_mask(name: str, mask: torch.Tensor, units: int) -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.dim() != 1 or mask.numel() != units:
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask for {name!r} must be a 1-D tensor of {units} entries, got {shape}")
    if not mask.dtype.is_floating_point and mask.dtype != torch.bool:
        raise ValueError(f"mask for {name!r} must be bool (keep) or float (gate values), got {mask.dtype}")
    if mask.dtype.is_floating_point and not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError(f"gate values for {name!r} must lie in [0, 1]")
    return mask.detach().cpu()


def _gated_columns(layer: nn.Linear, layout: StructuralLayout, kept_columns: torch.Tensor) -> torch.Tensor:
    """All input columns of `layer` that stay: those outside the layout's range, and the kept inside it."""
    start, stop = layout.out_offset, layout.out_offset + layout.units * layout.group
    return torch.cat([torch.arange(start), kept_columns + start, torch.arange(stop, layer.in_features)])


def _gated_scale(layer: nn.Linear, layout: StructuralLayout, scale: torch.Tensor) -> torch.Tensor:
    before, after = layout.out_offset, layer.in_features - layout.out_offset - layout.units * layout.group
    return torch.cat([torch.ones(before), scale, torch.ones(after)])


def _prune_one(model: nn.Module, name: str, module: nn.Module, layout: StructuralLayout, mask: torch.Tensor) -> bool:
    """Slice one attention/FFN to the units `mask` keeps; True when nothing is left (module emptied)."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    scale = None
    if mask.dtype != torch.bool and not bool((mask[keep] == 1).all()):
        scale = mask[keep].repeat_interleave(layout.group)
    owned = {id(m) for m in module.modules()}
    if not keep.any() and isinstance(module, nn.Linear):
        pass  # a single-stream block's proj_mlp: sliced to no rows below, its columns leave proj_out
    elif not keep.any():
        # Output layers outside the module (a single-stream block's proj_out) lose the module's columns.
        for layer in layout.out_layers:
            if id(layer) not in owned:
                _keep_columns(layer, _gated_columns(layer, layout, torch.zeros(0, dtype=torch.long)), None)
        _set_submodule(model, name, PrunedAttention(module) if layout.kind == "heads" else PrunedFeedForward(module))
        return True
    elif keep.all() and scale is None:
        return False
    units = keep.nonzero().flatten()
    columns = (units[:, None] * layout.group + torch.arange(layout.group)).flatten()
    rows = torch.cat([columns, columns + layout.units * layout.group]) if layout.glu else columns
    for layer in layout.in_layers:
        _keep_rows(layer, rows.to(layer.weight.device))
    for layer in layout.out_layers:
        device = layer.weight.device
        layer_scale = None if scale is None else _gated_scale(layer, layout, scale).to(device)
        _keep_columns(layer, _gated_columns(layer, layout, columns).to(device), layer_scale)
    if layout.kind == "heads":
        heads = int(units.numel())
        module.heads = heads
        for attr in ("inner_dim", "inner_kv_dim"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, heads * layout.group)
        if isinstance(getattr(module, "sliceable_head_dim", None), int):
            module.sliceable_head_dim = heads
    return not keep.any()


def _replace_empty_blocks(model: nn.Module) -> list[str]:
    replaced = []
    for name, block in list(model.named_modules()):
        if type(block).__name__ != "BasicTransformerBlock" or getattr(block, "norm_type", None) not in _RESIDUAL_NORMS:
            continue
        if getattr(block, "fuser", None) is not None:  # GLIGEN's gated self-attention still computes
            continue
        parts = [block.attn1, block.ff] + ([block.attn2] if block.attn2 is not None else [])
        if all(isinstance(part, (PrunedAttention, PrunedFeedForward)) for part in parts):
            if any(isinstance(p, PrunedAttention) and p.residual_connection for p in parts):
                continue
            _set_submodule(model, name, ResidualBlock(block))
            replaced.append(name)
    return replaced


def apply_structural_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], replace_blocks: bool = True
) -> StructuralPruningReport:
    """Remove, in place, the heads and FFN units the masks drop; returns what changed.

    masks: {module name: 1-D tensor over the module's heads (attention), hidden units (FeedForward, or
    a Flux single-stream block's proj_mlp) or output channels (LayerNorm/GroupNorm/RMSNorm)},
    bool (True = keep) or float gate values in [0, 1]: zeros are removed and the other values are
    folded into the output projections' columns, so the pruned model computes what the gated one did.
    Heads go as rows of to_q/to_k/to_v (and add_q/k/v_proj) and columns of to_out[0] (and to_add_out),
    with `heads`/`inner_dim` updated; units as rows of the FFN's first projection (both halves of a
    GEGLU/SwiGLU one) and columns of its output layer. A Flux single-stream block's heads and MLP units
    go as rows of to_q/to_k/to_v and proj_mlp and as the matching columns of proj_out, which reads
    [attention ; MLP]. Norm channels go as prunedm.structural.norms says (removed where sound, else folded in).
    Parts left empty are replaced as the module doc says; with replace_blocks, so are
    BasicTransformerBlocks left with nothing but their residual."""
    modules = dict(model.named_modules())
    layouts = structural_layouts(model)
    report = StructuralPruningReport(params_before=sum(p.numel() for p in model.parameters()))
    plans = []
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"apply_structural_masks: the model has no module named {name!r}")
        layout = layouts.get(name, "neither an attention (to_q, heads), a FeedForward nor a norm")
        if isinstance(layout, str) and norms.is_gateable_norm(modules[name]):
            layout = norms.norm_layout(model, name)
        if isinstance(layout, str):
            raise ValueError(f"apply_structural_masks: {name!r} cannot be pruned by heads/units: {layout}")
        plans.append((name, layout, _check_mask(name, mask, layout.units)))
    # Columns of a shared output layer go from the highest offset down, so that slicing one part
    # leaves the offsets of the parts still to come (a single-stream block's attention at 0) valid.
    plans.sort(key=lambda plan: -plan[1].out_offset)
    for name, layout, mask in plans:
        kept = int((mask != 0).sum())
        if layout.kind == "norm":
            report.norm_channels_before += layout.units
            report.norm_channels_after += kept
            if norms.prune_norm_channels(model, name, layout, mask):
                report.channel_selected_norms.append(name)
            elif not layout.out_layers and not bool((mask == 1).all()):
                report.masked_norms.append(name)
            continue
        if layout.kind == "heads":
            report.heads_before, report.heads_after = report.heads_before + layout.units, report.heads_after + kept
        else:
            report.ffn_units_before += layout.units
            report.ffn_units_after += kept
        if _prune_one(model, name, modules[name], layout, mask):
            report.emptied.append(name)
    if replace_blocks:
        report.residual_blocks = _replace_empty_blocks(model)
    report.params_after = sum(p.numel() for p in model.parameters())
    return report
