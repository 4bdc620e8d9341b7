"""The gate math of the structural learner: hard concrete gates (Louizos et al. 2018, "Learning Sparse
Neural Networks through L0 Regularization") and a straight-through two-class Gumbel-softmax gate."""

from __future__ import annotations

import math

import torch

HARD_CONCRETE_BETA, HARD_CONCRETE_GAMMA, HARD_CONCRETE_ZETA = 0.83, -0.1, 1.1

__all__ = ["hard_concrete_eval", "hard_concrete_l0", "hard_concrete_sample"]


def _logistic(u: torch.Tensor) -> torch.Tensor:
    return torch.log(u) - torch.log1p(-u)


def hard_concrete_sample(
    log_alpha: torch.Tensor,
    u: torch.Tensor,
    beta: float = HARD_CONCRETE_BETA,
    gamma: float = HARD_CONCRETE_GAMMA,
    zeta: float = HARD_CONCRETE_ZETA,
    eps: float = 0.0,
) -> torch.Tensor:
    """A hard concrete gate for uniform noise u in (0, 1): sigmoid((logit(u) + log_alpha) / beta),
    stretched to (gamma, zeta) and clamped to [0, 1], so exact 0 and 1 have positive probability.
    eps > 0 bounds the noise as EcoDiff's masking_eps does: log(u + eps) - log(1 - u + eps) lies within
    +-log((1 + eps) / eps) (0.5: +-1.10), so a gate with a large logit stays open."""
    noise = _logistic(u) if eps == 0 else torch.log(u + eps) - torch.log1p(eps - u)
    s = torch.sigmoid((noise + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_eval(
    log_alpha: torch.Tensor, gamma: float = HARD_CONCRETE_GAMMA, zeta: float = HARD_CONCRETE_ZETA
) -> torch.Tensor:
    """The test-time gate: clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_l0(
    log_alpha: torch.Tensor,
    beta: float = HARD_CONCRETE_BETA,
    gamma: float = HARD_CONCRETE_GAMMA,
    zeta: float = HARD_CONCRETE_ZETA,
) -> torch.Tensor:
    """P(gate != 0), the expected L0 norm per gate: sigmoid(log_alpha - beta * log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def _gumbel_two_class(logits: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through two-class Gumbel-softmax over (keep: logit, drop: 0): the difference of two
    Gumbel variables is logistic, so softmax([l + g1, g2] / tau)[0] = sigmoid((l + logit(u)) / tau)."""
    soft = torch.sigmoid((logits + _logistic(u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 forward, the soft gradient backward
