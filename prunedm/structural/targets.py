"""Which modules of a model take structural gates: attention heads, FFN hidden units (Flux single-stream
MLPs included) and, on request, norm output channels, filtered like the N:M learners' targets."""

from __future__ import annotations

from torch import nn

from prunedm.masks.targets import ModuleFilter, matches_filter
from prunedm.structural.heads import structural_layouts
from prunedm.structural.layout import StructuralLayout
from prunedm.structural.norms import is_gateable_norm, norm_layout

__all__ = ["find_structural_targets"]


def find_structural_targets(
    model: nn.Module,
    include: ModuleFilter = None,
    exclude: ModuleFilter = None,
    heads: bool = True,
    ffn: bool = True,
    norms: ModuleFilter = None,
) -> tuple[dict[str, StructuralLayout], dict[str, str]]:
    """(targets, skipped): gate layouts of the model's attentions (heads), FeedForwards and Flux single-
    stream MLPs (hidden units) by module name, filtered like the N:M learners' targets (regex searched in
    the name, or a predicate of (name, module)); with `norms` (a regex or predicate), also the output
    channels of the LayerNorm/GroupNorm/RMSNorm modules it selects (`exclude` applies to them too).
    skipped maps a matching module that cannot take gates to the reason. Raises ValueError naming
    `include` (`norms`) when it matches no attention or FeedForward (no norm) at all."""
    modules = dict(model.named_modules())
    targets, skipped, matched = {}, {}, 0
    for name, layout in structural_layouts(model).items():
        module = modules[name]
        if include is not None and not matches_filter(include, name, module):
            continue
        matched += 1
        if matches_filter(exclude, name, module):
            continue
        if isinstance(layout, str):
            skipped[name] = layout
        elif (layout.kind == "heads" and heads) or (layout.kind == "ffn" and ffn):
            targets[name] = layout
    if include is not None and not matched:
        raise ValueError(f"include pattern {include!r} matches no attention or FeedForward module of the model")
    if norms is not None:
        matched = 0
        for name, module in modules.items():
            if not name or not matches_filter(norms, name, module) or matches_filter(exclude, name, module):
                continue
            if is_gateable_norm(module):
                matched += 1
                targets[name] = norm_layout(model, name)
            elif "Norm" in type(module).__name__:
                skipped[name] = (
                    f"{type(module).__name__} is not a LayerNorm, GroupNorm or RMSNorm (gate its inner norm)"
                )
        if not matched:
            raise ValueError(f"norms pattern {norms!r} matches no LayerNorm, GroupNorm or RMSNorm of the model")
    return targets, skipped
