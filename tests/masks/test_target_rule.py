"""One rule of which layers are N:M targets (prunedm.nn.sparsify.nm_shape_problem): the mask learners' targets,
finetune's keep_sparsity masks and sparsify's shape checks agree layer by layer."""

from __future__ import annotations

import torch
from torch import nn

from prunedm import ops
from prunedm.masks import apply_masks, find_targets, magnitude_masks, matrix_to_weight, weight_matrix
from prunedm.nn.sparsify import ineligible_reason, nm_shape_problem
from prunedm.train.finetune import nm_sparse_masks


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64),  # a target
        nn.Linear(64, 6),
        nn.Linear(6, 64),  # in_features 6: not a multiple of 4
        nn.Conv2d(8, 64, 3),  # a target
        nn.Conv2d(6, 64, 2),  # GEMM K = 24 is a multiple of 4, but groups of 4 would straddle taps (Cin 6)
        nn.Conv2d(8, 64, 3, groups=2),  # grouped
    )


def test_learners_keep_sparsity_and_sparsify_share_the_rule():
    model = _model()
    targets, skipped = find_targets(model)
    assert sorted(targets) == ["0", "1", "3"]
    assert skipped == {name: nm_shape_problem(model.get_submodule(name)) for name in ("2", "4", "5")}
    assert "in_features=6 is not a multiple of m = 4" in skipped["2"]
    assert "in_channels=6" in skipped["4"] and "groups=2" in skipped["5"]
    for name, reason in skipped.items():
        assert ineligible_reason(model.get_submodule(name)) == reason  # sparsify refuses them for the same reason

    apply_masks(model, magnitude_masks(targets))
    # The Cin-6 conv made 2:4 along its flattened GEMM K: still not a target, as sparsify could not pack it.
    apply_masks(model, {"4": matrix_to_weight(model[4], ops.nm_mask(weight_matrix(model[4]).float()))})
    assert ops.is_nm_sparse(weight_matrix(model[4]).float(), 2, 4)
    assert sorted(nm_sparse_masks(model)) == sorted(targets)
