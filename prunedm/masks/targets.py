"""Which layers an N:M mask applies to, and their weights as GEMM matrices: Linear weights as they are,
Conv2d weights as [Cout, kh*kw*Cin] (prunedm.ops.conv_weight_to_matrix), so N:M groups run along Cin."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunedm import ops
from prunedm.nn.sparsify import nm_shape_problem

DEFAULT_TYPES = (nn.Linear, nn.Conv2d)

# A module filter: a regex searched in the module's name, or a predicate of (name, module).
ModuleFilter = str | Callable[[str, nn.Module], bool] | None


def matches_filter(rule: ModuleFilter, name: str, module: nn.Module) -> bool:
    """Whether a module filter selects the module: a regex searched in its name, or a predicate of (name, module)."""
    if rule is None:
        return False
    if isinstance(rule, str):
        return re.search(rule, name) is not None
    return bool(rule(name, module))


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight parameter itself, also while a mask learner has parametrized it."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMM view of a Linear or Conv2d weight: [out, in], or [Cout, kh*kw*Cin] for a conv (a copy)."""
    weight = raw_weight(module) if weight is None else weight
    if isinstance(module, nn.Conv2d):
        return ops.conv_weight_to_matrix(weight)
    return weight


def matrix_to_weight(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of weight_matrix: a tensor of the module's weight shape. Differentiable."""
    if isinstance(module, nn.Conv2d):
        return ops.matrix_to_conv_weight(matrix, tuple(raw_weight(module).shape))
    return matrix


def find_targets(
    model: nn.Module,
    m: int = 4,
    *,
    types: Iterable[type] = DEFAULT_TYPES,
    include: ModuleFilter = None,
    exclude: ModuleFilter = None,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(targets, skipped): the modules of `types` whose weights can take an m-wide N:M mask, by name.

    include: only modules whose name matches (regex searched in the name, or a predicate of
    (name, module)); exclude: drop modules that match. skipped maps each excluded-for-shape
    module to the reason (prunedm.nn.sparsify.nm_shape_problem: grouped conv, input not a multiple of m)."""
    types = tuple(types)
    targets, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if include is not None and not matches_filter(include, name, module):
            continue
        if matches_filter(exclude, name, module):
            continue
        reason = nm_shape_problem(module, m)
        if reason is None:
            targets[name] = module
        else:
            skipped[name] = reason
    return targets, skipped


@torch.no_grad()
def magnitude_masks(targets: dict[str, nn.Module], n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """Bool masks (weight-shaped) keeping the n largest |w| of every m along each target's GEMM K."""
    return {
        name: matrix_to_weight(module, ops.nm_mask(weight_matrix(module).float(), n, m))
        for name, module in targets.items()
    }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the weights each mask (weight-shaped, keyed by module name) does not keep."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = raw_weight(modules[name])
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def nm_violations(module: nn.Module, mask: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Groups of the module's GEMM matrix where a weight-shaped mask keeps more than n of m."""
    return ops.nm_violations(weight_matrix(module, mask.to(raw_weight(module).dtype)), n, m)
