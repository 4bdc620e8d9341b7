"""Structural pruning of diffusion models: channels of UNets (torch-pruning, Diff-Pruning's ratios),
transformer blocks of DiTs (fixed lists, Block Influence, TinyFusion's learned keep patterns)."""

from prunedm.pruning.channels import (
    TWO_FOUR_WIDTH_MULTIPLE,
    WIDTH_ORIGIN_ATTR,
    ChannelPruningReport,
    count_macs_and_params,
    default_example_inputs,
    first_sparse_layer,
    kept_channels,
    layer_widths,
    prune_channels,
    resolve_round_to,
)
from prunedm.pruning.depth import (
    DepthPruningReport,
    block_influence,
    keep_every,
    keep_most_influential,
    prune_depth,
)
from prunedm.pruning.fixups import sync_diffusers_attributes
from prunedm.pruning.importance import IMPORTANCES, GradientPass, accumulate_denoising_gradients, make_importance
from prunedm.pruning.tinyfusion import (
    TINYFUSION_PRESETS,
    DepthSearchResult,
    denoising_loss,
    keep_patterns,
    learn_depth_keep,
    sample_keep_gates,
)

__all__ = [
    "TINYFUSION_PRESETS",
    "TWO_FOUR_WIDTH_MULTIPLE",
    "WIDTH_ORIGIN_ATTR",
    "IMPORTANCES",
    "ChannelPruningReport",
    "DepthPruningReport",
    "DepthSearchResult",
    "GradientPass",
    "accumulate_denoising_gradients",
    "block_influence",
    "count_macs_and_params",
    "default_example_inputs",
    "denoising_loss",
    "first_sparse_layer",
    "keep_every",
    "keep_most_influential",
    "keep_patterns",
    "kept_channels",
    "layer_widths",
    "learn_depth_keep",
    "make_importance",
    "prune_channels",
    "prune_depth",
    "resolve_round_to",
    "sample_keep_gates",
    "sync_diffusers_attributes",
]
