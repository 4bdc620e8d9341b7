"""MaskLLM-style N:M mask learning (Fang et al., NeurIPS 2024): a learnable categorical distribution over
the C(m, n) candidate patterns of every group, sampled by Gumbel softmax, trained end to end."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from prunedm import ops
from prunedm.masks import targets as _targets
from prunedm.masks.learner import LossFn, MaskLearner, is_finite_number
from prunedm.masks.schedules import anneal


class MaskLLMLearner(MaskLearner):
    """Learns N:M masks as pattern logits [R, K/m, C(m, n)] per target layer (GEMM layout: Linear
    weights as they are, Conv2d as [Cout, kh*kw*Cin], groups along Cin).

    Each step samples every group's pattern with ops.gumbel_pattern_sample(logits * scale, tau,
    hard=True): a hard N:M mask forward, the soft mask's gradient backward (straight-through). The
    temperature anneals tau[0] -> tau[1] and the logit scale scale[0] -> scale[1] over total_steps
    (`schedule`: linear, exp or cosine), so sampling starts exploratory and ends near-deterministic.

    Initialisation: logits ~ N(0, init_std), plus prior_strength * std(logits) on the pattern of the
    prior mask ("magnitude": the magnitude N:M mask; a dict of weight-shaped masks by module name; None:
    no prior). weight_reg > 0 adds weight_reg * (1 - |W * M|^2 / |W|^2) per layer (MaskLLM's sparse
    weight regularization: prefer masks that keep the weights' magnitude). The final mask of a group is
    its most likely pattern (argmax of the logits).

    loss_fn(model, batch) -> scalar tensor is the task loss; step(batch) samples, back-propagates into
    the logits (AdamW, mask_lr) and, with model_lr > 0, the weights, then advances the schedules.

    mask_lr defaults to 5e-3, not the paper's 5e-2: the paper learns for thousands of steps, while in a
    run of tens to hundreds of steps Adam's first updates at 5e-2 (~0.05 per logit, x scale) swamp the
    prior's margin (prior_strength * init_std = 0.06). On the shipped digits DDPM, 40 steps gave a final
    loss of 0.110 at 5e-2, 0.036 at 5e-3, and 0.087 for the magnitude mask."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        n: int = 2,
        m: int = 4,
        *,
        prior: str | dict[str, torch.Tensor] | None = "magnitude",
        prior_strength: float = 3.0,
        init_std: float = 0.02,
        tau: tuple[float, float] = (4.0, 0.05),
        scale: tuple[float, float] = (1e2, 5e2),
        schedule: str = "linear",
        total_steps: int = 1000,
        weight_reg: float = 0.0,
        mask_lr: float = 5e-3,
        model_lr: float = 0.0,
        types: Iterable[type] = _targets.DEFAULT_TYPES,
        include: _targets.ModuleFilter = None,
        exclude: _targets.ModuleFilter = None,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__(model, loss_fn, n, m, model_lr=model_lr, types=types, include=include, exclude=exclude,
                         seed=seed, backend=backend)  # fmt: skip
        if total_steps < 1:
            raise ValueError(f"MaskLLMLearner: total_steps must be >= 1, got {total_steps}")
        self.tau_range, self.scale_range = tuple(tau), tuple(scale)
        self.schedule, self.total_steps = schedule, int(total_steps)
        self.weight_reg = float(weight_reg)
        anneal(1.0, 1.0, 0.0, schedule)  # validates the schedule kind
        self.num_patterns = math.comb(m, n)
        priors = _targets.magnitude_masks(self.targets, n, m) if prior == "magnitude" else prior
        generator = torch.Generator().manual_seed(self.seed)
        self.logits: dict[str, nn.Parameter] = {}
        for name, module in self.targets.items():
            rows, cols = _targets.weight_matrix(module).shape
            logits = torch.randn(rows, cols // m, self.num_patterns, generator=generator) * init_std
            if priors is not None:
                prior_matrix = _targets.weight_matrix(module, priors[name].to(torch.float32).cpu())
                index = ops.pattern_index(prior_matrix, n, m)
                if bool((index < 0).any()):
                    raise ValueError(f"MaskLLMLearner: the prior mask of {name} is not exactly {n}:{m}")
                boost = torch.zeros_like(logits).scatter_(-1, index.unsqueeze(-1), prior_strength * float(logits.std()))
                logits += boost
            device = _targets.raw_weight(module).device
            self.logits[name] = nn.Parameter(logits.to(device))
        self.mask_optimizer = torch.optim.AdamW(list(self.logits.values()), lr=mask_lr, weight_decay=0.0)

    # Schedules -----------------------------------------------------------------------------------

    @property
    def progress(self) -> float:
        return min(1.0, self.step_count / self.total_steps)

    @property
    def tau(self) -> float:
        return anneal(*self.tau_range, self.progress, self.schedule)

    @property
    def scale(self) -> float:
        return anneal(*self.scale_range, self.progress, self.schedule)

    # Learning ------------------------------------------------------------------------------------

    def sample(self) -> dict[str, torch.Tensor]:
        """Draw this step's masks (GEMM layout, differentiable in the logits) and put them on the model."""
        tau, scale = self.tau, self.scale
        matrices = {}
        for index, (name, logits) in enumerate(self.logits.items()):
            matrices[name] = ops.gumbel_pattern_sample(
                logits * scale, self.n, self.m, tau, True, self._sample_seed(index), backend=self.backend
            )
        self._set_matrix_masks(matrices)
        return matrices

    def regularization(self, matrices: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over layers of 1 - |W * M|^2 / |W|^2 (weights detached): low when masks keep large weights."""
        terms = []
        for name, module in self.targets.items():
            weight = _targets.weight_matrix(module).detach().float()
            kept = (weight * matrices[name].float()).pow(2).sum()
            terms.append(1 - kept / weight.pow(2).sum().clamp_min(1e-30))
        return torch.stack(terms).mean()

    def step(self, batch) -> dict:
        """One learning step on a batch: sample masks, loss (+ regularizer), backward, update, anneal."""
        tau, scale = self.tau, self.scale
        matrices = self.sample()
        loss = self.loss_fn(self.model, batch)
        total = loss
        if self.weight_reg:
            total = total + self.weight_reg * self.regularization(matrices)
        self.mask_optimizer.zero_grad(set_to_none=True)
        if self.model_optimizer is not None:
            self.model_optimizer.zero_grad(set_to_none=True)
        total.backward()
        self._average_across_ranks([logits.grad for logits in self.logits.values() if logits.grad is not None])
        self._average_model_grads()
        self.mask_optimizer.step()
        if self.model_optimizer is not None:
            self.model_optimizer.step()
        self._set_matrix_masks(None)
        self.step_count += 1
        losses = torch.tensor([float(loss.detach())], dtype=torch.float64, device=self._device)
        self._average_across_ranks([losses])
        return {"loss": float(losses[0]), "tau": tau, "scale": scale}

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        result = {}
        for name, module in self.targets.items():
            index = self.logits[name].argmax(-1)
            result[name] = _targets.matrix_to_weight(module, ops.patterns_to_mask(index, self.n, self.m))
        return result

    @torch.no_grad()
    def pattern_probabilities(self) -> dict[str, torch.Tensor]:
        """softmax(logits * scale) at the current scale: each group's distribution over patterns."""
        return {name: torch.softmax(logits * self.scale, -1) for name, logits in self.logits.items()}

    # State ---------------------------------------------------------------------------------------

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"logits.{name}": logits for name, logits in self.logits.items()}

    @torch.no_grad()
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, logits in self.logits.items():
            logits.copy_(tensors[f"logits.{name}"])

    def _extra_state(self) -> dict:
        return {"tau": list(self.tau_range), "scale": list(self.scale_range), "schedule": self.schedule,
                "total_steps": self.total_steps}  # fmt: skip

    def _check_extra_state(self, state: dict) -> None:
        for key in ("tau", "scale"):
            pair = state[key]
            if not isinstance(pair, list) or len(pair) != 2 or not all(is_finite_number(x) and x > 0 for x in pair):
                raise ValueError(f"MaskLLMLearner: state {key} must be two positive numbers, got {pair!r}")
        anneal(1.0, 1.0, 0.0, state["schedule"])
        total = state["total_steps"]
        if not isinstance(total, int) or isinstance(total, bool) or total < 1:
            raise ValueError(f"MaskLLMLearner: state total_steps must be an integer >= 1, got {total!r}")

    def _load_extra_state(self, state: dict) -> None:
        self.tau_range, self.scale_range = tuple(state["tau"]), tuple(state["scale"])
        self.schedule, self.total_steps = state["schedule"], state["total_steps"]
