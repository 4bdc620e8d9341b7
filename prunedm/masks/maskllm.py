"""MaskLLM-style N:M mask learning (Fang et al., NeurIPS 2024): a learnable categorical distribution over
the C(m, n) candidate patterns of every group, sampled by Gumbel softmax, trained end to end.

Official code (NVlabs/MaskLLM: learnable_sparsity/differentiable_mask.py, pretrain_maskllm.py and
scripts/learnable_sparsity/*.sh): gates ~ N(0, 0.01); soft Gumbel-softmax masks (hard is an option);
temperature 4 -> 0.05 and logit scale 1e2 -> 5e2, linear in iteration / train_iters; prior strength 3
adding (overlap with the prior - 1) * std(gates) * strength to each pattern; the loss minus
weight_reg * (1 - it/T) * sum ||W (.) M||^2 with weight_reg 1e-5; mask lr 5e-5 x lr-mult 10 = 5e-4
(LLMs; 1e-3 for ViTs). That is the "official" preset and the default. Deviations, with reasons:
- AdamW on the logits at a constant lr, no weight decay, no gradient clipping (the official run uses
  Megatron's optimizer: cosine lr to 1/10, weight decay 0.1, clip 1.0, betas 0.9/0.95): the mask
  learner has no other parameters to share those with, and the schedules above are what it anneals.
- The "short" preset (hard masks, lr 5e-3, std 0.02, no regulariser) is prunedm's for tens to hundreds
  of steps: soft masks at lr 5e-4 barely move the logits in that budget (see PRESETS)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import nn

from prunedm import ops
from prunedm.masks import targets as _targets
from prunedm.masks.learner import LossFn, MaskLearner, is_finite_number
from prunedm.masks.schedules import anneal
from prunedm.parallel import fsdp

WEIGHT_REGS = ("official", "normalized")

# Named presets. "official": the constants above. "short": the values that learned on the shipped
# digits DDPM in 40 steps (loss 0.036 vs 0.087 for the magnitude mask; 0.110 at lr 5e-2, whose first Adam
# updates swamp the prior's margin of prior_strength * init_std = 0.06).
PRESETS: dict[str, dict] = {
    "official": {"hard": False, "init_std": 0.01, "tau": (4.0, 0.05), "scale": (1e2, 5e2), "prior_strength": 3.0,
                 "mask_lr": 5e-4, "weight_reg": 1e-5},
    "short": {"hard": True, "init_std": 0.02, "tau": (4.0, 0.05), "scale": (1e2, 5e2), "prior_strength": 3.0,
              "mask_lr": 5e-3, "weight_reg": 0.0},
}  # fmt: skip


class _ScaledSample(torch.autograd.Function):
    """sample(logits * scale) keeping the logits (a parameter: no copy) for the backward rather than the product (a
    [groups, C(m, n)] tensor per layer, 1.5 floats per weight at 2:4, alive until the backward): the backward
    recomputes the product and the sample's gradient (the same Philox stream), bitwise the composition's."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, scale: float, sample) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.scale, ctx.sample = scale, sample
        return sample(logits * scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        with torch.enable_grad():
            scaled = (logits.detach() * ctx.scale).requires_grad_()
            (grad_scaled,) = torch.autograd.grad(ctx.sample(scaled), scaled, grad)
        return grad_scaled * ctx.scale, None, None


def scaled_pattern_sample(logits: torch.Tensor, scale: float, *args, offset: int = 0, **kwargs) -> torch.Tensor:
    """ops.gumbel_pattern_sample(logits * scale, *args, offset=offset, **kwargs), the same values and gradient,
    without keeping logits * scale for the backward."""

    def sample(scaled: torch.Tensor) -> torch.Tensor:
        return ops.gumbel_pattern_sample(scaled, *args, offset=offset, **kwargs)

    return _ScaledSample.apply(logits, scale, sample)


def prior_graded(index: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[..., C(m, n)]: how many kept weights each candidate pattern shares with the prior pattern `index`
    (n for the prior itself, 0 for its complement when m = 2n)."""
    patterns = ops.nm_patterns(n, m).to(torch.float32)  # [C, m]
    return patterns[index] @ patterns.T


class MaskLLMLearner(MaskLearner):
    """Learns N:M masks as pattern logits [R, K/m, C(m, n)] per target layer (GEMM layout: Linear
    weights as they are, Conv2d as [Cout, kh*kw*Cin], groups along Cin).

    Each step samples every group's pattern with ops.gumbel_pattern_sample(logits * scale, tau, hard):
    soft (the default, as official): the Gumbel-softmax mixture of patterns in the forward; hard: one
    pattern forward, the soft mask's gradient backward (straight-through). The temperature anneals
    tau[0] -> tau[1] and the logit scale scale[0] -> scale[1] over total_steps (`schedule`: linear, exp
    or cosine), so sampling starts exploratory and ends near-deterministic.

    Initialisation: logits ~ N(0, init_std), plus (overlap - 1) * prior_strength * std(logits) per
    pattern, overlap = how many kept weights it shares with the prior mask ("magnitude": the magnitude
    N:M mask; a dict of weight-shaped masks by module name; None: no prior): for 2:4 the prior pattern
    rises, the four sharing one kept weight stay, the complement falls. weight_reg > 0 subtracts
    weight_reg * (1 - progress) * sum over layers of ||W (.) M||^2 (weights detached; "official"), or
    with weight_reg_kind "normalized" adds weight_reg * mean over layers of 1 - ||W (.) M||^2 / ||W||^2
    (scale-free, not decayed). The final mask of a group is its most likely pattern (argmax of the logits).

    loss_fn(model, batch) -> scalar tensor is the task loss; step(batch) samples, back-propagates into
    the logits (AdamW, mask_lr) and, with model_lr > 0, the weights, then advances the schedules.
    preset ("official" or "short", see PRESETS) fills every option left at None."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        n: int = 2,
        m: int = 4,
        *,
        preset: str = "official",
        prior: str | dict[str, torch.Tensor] | None = "magnitude",
        prior_strength: float | None = None,
        init_std: float | None = None,
        tau: tuple[float, float] | None = None,
        scale: tuple[float, float] | None = None,
        hard: bool | None = None,
        schedule: str = "linear",
        total_steps: int = 1000,
        weight_reg: float | None = None,
        weight_reg_kind: str = "official",
        mask_lr: float | None = None,
        model_lr: float = 0.0,
        types: Iterable[type] = _targets.DEFAULT_TYPES,
        include: _targets.ModuleFilter = None,
        exclude: _targets.ModuleFilter = None,
        seed: int = 0,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"MaskLLMLearner: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        given = {"prior_strength": prior_strength, "init_std": init_std, "tau": tau, "scale": scale, "hard": hard,
                 "weight_reg": weight_reg, "mask_lr": mask_lr}  # fmt: skip
        options = {key: PRESETS[preset][key] if value is None else value for key, value in given.items()}
        prior_strength, init_std, tau, scale = (options[k] for k in ("prior_strength", "init_std", "tau", "scale"))
        if weight_reg_kind not in WEIGHT_REGS:
            raise ValueError(f"MaskLLMLearner: weight_reg_kind must be one of {WEIGHT_REGS}, got {weight_reg_kind!r}")
        super().__init__(model, loss_fn, n, m, model_lr=model_lr, types=types, include=include, exclude=exclude,
                         seed=seed, backend=backend, compute_dtype=compute_dtype)  # fmt: skip
        if total_steps < 1:
            raise ValueError(f"MaskLLMLearner: total_steps must be >= 1, got {total_steps}")
        self.tau_range, self.scale_range = tuple(tau), tuple(scale)
        self.schedule, self.total_steps = schedule, int(total_steps)
        self.preset, self.hard = preset, bool(options["hard"])
        self.weight_reg, self.weight_reg_kind = float(options["weight_reg"]), weight_reg_kind
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
                logits += (prior_graded(index, n, m) - 1) * (prior_strength * float(logits.std()))
            device = _targets.raw_weight(module).device
            self.logits[name] = nn.Parameter(logits.to(device))
        self.mask_optimizer = torch.optim.AdamW(list(self.logits.values()), lr=options["mask_lr"], weight_decay=0.0)
        self._use_compute_dtype()

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

    def _sample_one(self, index: int, name: str, tau: float, scale: float) -> torch.Tensor:
        """Target `name`'s (the index-th) mask at this step, GEMM layout, differentiable in its logits."""
        seed = self._sample_seed(index)
        return fsdp.sample_rows(
            scaled_pattern_sample, self.logits[name], scale, self.n, self.m, tau, self.hard, seed, backend=self.backend
        )

    def _mask_when_run(self, index: int, name: str, tau: float, scale: float) -> torch.Tensor:
        return _targets.matrix_to_weight(self.targets[name], self._sample_one(index, name, tau, scale))

    def sample(self) -> dict[str, torch.Tensor]:
        """Draw this step's masks (GEMM layout, differentiable in the logits) and put them on the model."""
        tau, scale = self.tau, self.scale
        matrices = {name: self._sample_one(index, name, tau, scale) for index, name in enumerate(self.logits)}
        self._set_matrix_masks(matrices)
        return matrices

    def sample_when_run(self) -> None:
        """Put this step's masks on the model as sample() does, each drawn when its layer runs: autograd keeps the
        frozen weight, not the mask, so no full mask outlives its layer (sharded: one layer's gathered mask at a
        time, not every layer's)."""
        tau, scale = self.tau, self.scale
        for index, name in enumerate(self.logits):
            self._hooks[name].mask = functools.partial(self._mask_when_run, index, name, tau, scale)

    def regularization(self, matrices: dict[str, torch.Tensor]) -> torch.Tensor:
        """The term added to the loss, times weight_reg (weights detached; low when masks keep large weights).
        official: -(1 - progress) * sum over layers of ||W (.) M||^2; normalized: mean over layers of
        1 - ||W (.) M||^2 / ||W||^2. Where FSDP2 holds W sharded (by rows, as the logits), each rank takes its
        rows times the rank count, so that the gradient averaged over ranks is the full term's (its value is not)."""
        terms = []
        for name, module in self.targets.items():
            raw = _targets.raw_weight(module)
            local, first = fsdp.local_rows(raw)
            weight = _targets.weight_matrix(module, local.detach()).float()
            kept = (weight * matrices[name][first : first + weight.shape[0]].float()).pow(2).sum()
            total = weight.pow(2).sum()
            if local is not raw:
                kept, total = kept * fsdp.world_size(), fsdp.sum_over_ranks(total)
            if self.weight_reg_kind == "official":
                terms.append(kept)
            else:
                terms.append(1 - kept / total.clamp_min(1e-30))
        if self.weight_reg_kind == "official":
            return -(1 - self.progress) * torch.stack(terms).sum()
        return torch.stack(terms).mean()

    def step(self, batch) -> dict:
        """One learning step on a batch: sample masks, loss (+ regularizer), backward, update, anneal."""
        tau, scale = self.tau, self.scale
        if self.weight_reg:  # the regulariser reads every mask after the forward
            matrices = self.sample()
        else:
            self.sample_when_run()
        with self._recompute.active():  # each layer's W * M remade in the backward, not kept from the forward
            loss = self.loss_fn(self.model, batch)
        total = loss
        if self.weight_reg:
            total = total + self.weight_reg * self.regularization(matrices)
        self.mask_optimizer.zero_grad(set_to_none=True)
        if self.model_optimizer is not None:
            self.model_optimizer.zero_grad(set_to_none=True)
        total.backward()
        if not self.sharded:  # sharded: fsdp.sample_rows' backward averaged the gradient already
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
            index = fsdp.full_rows(self.logits[name], lambda rows: rows.argmax(-1))
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
                "total_steps": self.total_steps, "hard": self.hard, "weight_reg": self.weight_reg,
                "weight_reg_kind": self.weight_reg_kind}  # fmt: skip

    def _check_extra_state(self, state: dict) -> None:
        for key in ("tau", "scale"):
            pair = state[key]
            if not isinstance(pair, list) or len(pair) != 2 or not all(is_finite_number(x) and x > 0 for x in pair):
                raise ValueError(f"MaskLLMLearner: state {key} must be two positive numbers, got {pair!r}")
        anneal(1.0, 1.0, 0.0, state["schedule"])
        total = state["total_steps"]
        if not isinstance(total, int) or isinstance(total, bool) or total < 1:
            raise ValueError(f"MaskLLMLearner: state total_steps must be an integer >= 1, got {total!r}")
        if not isinstance(state.get("hard", True), bool) or not is_finite_number(state.get("weight_reg", 0.0)):
            raise ValueError(f"MaskLLMLearner: state hard must be a bool and weight_reg a number, got {state!r}"[:200])
        if state.get("weight_reg_kind", "normalized") not in WEIGHT_REGS:
            raise ValueError(f"MaskLLMLearner: state weight_reg_kind must be one of {WEIGHT_REGS}")

    def _load_extra_state(self, state: dict) -> None:
        self.tau_range, self.scale_range = tuple(state["tau"]), tuple(state["scale"])
        self.schedule, self.total_steps = state["schedule"], state["total_steps"]
        # Files written before soft masks and the official regulariser: hard masks, the normalized form.
        self.hard = state.get("hard", True)
        self.weight_reg = state.get("weight_reg", self.weight_reg)
        self.weight_reg_kind = state.get("weight_reg_kind", "normalized")
