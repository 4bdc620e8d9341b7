"""Structural gates (EcoDiff-style) and the removal they drive: one learnable gate per attention head, FFN
hidden unit or norm channel, then the closed ones physically removed.

gates (hard concrete, Gumbel) -> layout (where gates attach, the slicing) -> heads (attention/FFN layouts,
the replacement modules, apply_structural_masks) and norms (norm channels) -> targets (which modules of a
model take gates) -> learner (StructuralGateLearner: timestep objective) -> ecodiff (EcoDiffLearner: the
paper's end-to-end objective). Importing this package registers the replacement modules' structure hooks
with prunedm.serialization, so saved pruned models load."""

from prunedm.structural.ecodiff import ECODIFF_PRESETS, DDIMChain, EcoDiffLearner, binarize_keep_ratio
from prunedm.structural.gates import hard_concrete_eval, hard_concrete_l0, hard_concrete_sample
from prunedm.structural.heads import (
    PrunedAttention,
    PrunedFeedForward,
    ResidualBlock,
    StructuralPruningReport,
    apply_structural_masks,
    structural_layout,
    structural_layouts,
)
from prunedm.structural.layout import StructuralLayout
from prunedm.structural.learner import GATE_TYPES, StructuralGateLearner, denoiser_output
from prunedm.structural.norms import ChannelSelectedNorm, is_gateable_norm, norm_layout, prune_norm_channels
from prunedm.structural.targets import find_structural_targets

__all__ = [
    "ECODIFF_PRESETS",
    "GATE_TYPES",
    "ChannelSelectedNorm",
    "DDIMChain",
    "EcoDiffLearner",
    "PrunedAttention",
    "PrunedFeedForward",
    "ResidualBlock",
    "StructuralGateLearner",
    "StructuralLayout",
    "StructuralPruningReport",
    "apply_structural_masks",
    "binarize_keep_ratio",
    "denoiser_output",
    "find_structural_targets",
    "hard_concrete_eval",
    "hard_concrete_l0",
    "hard_concrete_sample",
    "is_gateable_norm",
    "norm_layout",
    "prune_norm_channels",
    "structural_layout",
    "structural_layouts",
]
