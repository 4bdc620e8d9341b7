"""MaskPro-style N:M mask learning (linear-space probabilistic masks): one logit per weight, masks drawn
n of m without replacement, logits trained by forward-only REINFORCE against the initial mask's loss."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from prunedm import ops
from prunedm.masks import targets as _targets
from prunedm.masks.learner import LossFn, MaskLearner, is_finite_number


def top_n_mask(logits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest logits of every m along the last dim (ties to the lower index)."""
    groups = logits.reshape(*logits.shape[:-1], logits.shape[-1] // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(logits.shape)


def set_log_prob(logits: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[..., K/m]: log-probability that n draws without replacement from softmax(group logits) keep exactly
    the set `mask` marks, summed over the set's n! draw orders (exact; differentiable in logits)."""
    groups = logits.reshape(*logits.shape[:-1], logits.shape[-1] // m, m)
    kept = mask.reshape(groups.shape)
    # The kept indices of each group, in increasing order.
    index = torch.sort(kept.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n]
    log_p = torch.log_softmax(groups.float(), -1).gather(-1, index)  # [..., G, n]
    p = log_p.exp()
    orders = []
    for order in itertools.permutations(range(n)):
        used = torch.zeros_like(p[..., 0])
        log_prob = torch.zeros_like(used)
        for i in order:
            log_prob = log_prob + log_p[..., i] - torch.log1p(-used.clamp(max=1 - 1e-7))
            used = used + p[..., i]
        orders.append(log_prob)
    return torch.logsumexp(torch.stack(orders, -1), -1)


class MaskProLearner(MaskLearner):
    """Learns N:M masks as one logit per weight, initialised to initial_mask * logit_init (initial_masks:
    "magnitude" or a dict of weight-shaped masks by module name).

    Each step(batch) draws every group's kept set as n samples without replacement from softmax of its
    m logits (ops.gumbel_nm_sample, hard) and evaluates the loss twice, forward only: with the initial
    mask and with the sampled one, on the same batch and the same random stream. The loss change
    delta = L(sampled) - L(initial) updates a moving-average baseline b <- decay * b + (1 - decay) * delta,
    and the logits take a REINFORCE step: logits -= mask_lr * (delta - b) * grad log P(sampled sets)
    (exact set probabilities; SGD, as in MaskPro). No gradient flows through the network for the masks;
    with model_lr > 0 the weights are also trained (AdamW) on the sampled mask's loss, which needs a
    backward pass. The final mask keeps the n largest logits of each group."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        n: int = 2,
        m: int = 4,
        *,
        initial_masks: str | dict[str, torch.Tensor] = "magnitude",
        logit_init: float = 10.0,
        mask_lr: float = 50.0,
        model_lr: float = 0.0,
        baseline_decay: float = 0.99,
        types: Iterable[type] = _targets.DEFAULT_TYPES,
        include: _targets.ModuleFilter = None,
        exclude: _targets.ModuleFilter = None,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__(model, loss_fn, n, m, model_lr=model_lr, types=types, include=include, exclude=exclude,
                         seed=seed, backend=backend)  # fmt: skip
        if not 0 <= baseline_decay < 1:
            raise ValueError(f"MaskProLearner: baseline_decay must be in [0, 1), got {baseline_decay}")
        self.baseline_decay, self.baseline = float(baseline_decay), 0.0
        masks = _targets.magnitude_masks(self.targets, n, m) if initial_masks == "magnitude" else initial_masks
        self.initial: dict[str, torch.Tensor] = {}
        self.logits: dict[str, nn.Parameter] = {}
        for name, module in self.targets.items():
            weight = _targets.raw_weight(module)
            initial = _targets.weight_matrix(module, masks[name].to(device=weight.device, dtype=torch.float32))
            if ops.nm_violations(initial, n, m) or int((initial != 0).sum()) != initial.numel() * n // m:
                raise ValueError(f"MaskProLearner: the initial mask of {name} is not exactly {n}:{m}")
            self.initial[name] = initial != 0
            self.logits[name] = nn.Parameter(initial * logit_init)
        self.mask_optimizer = torch.optim.SGD(list(self.logits.values()), lr=mask_lr)

    @torch.no_grad()
    def sample(self) -> dict[str, torch.Tensor]:
        """This step's sampled masks (bool, GEMM layout), put on the model."""
        matrices = {}
        for index, (name, logits) in enumerate(self.logits.items()):
            seed = self._sample_seed(index)
            matrices[name] = ops.gumbel_nm_sample(logits, self.n, self.m, 1.0, True, seed, backend=self.backend) != 0
        self._set_matrix_masks(matrices)
        return matrices

    def step(self, batch) -> dict:
        """One REINFORCE step; returns the sampled and initial losses, the advantage and the baseline."""
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        with torch.no_grad():
            self._set_matrix_masks(self.initial)
            initial_loss = float(self.loss_fn(self.model, batch))
        # The same random stream (diffusion noise, timesteps) for both losses of the batch.
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        sampled = self.sample()
        train_weights = self.model_optimizer is not None
        with torch.set_grad_enabled(train_weights):
            loss = self.loss_fn(self.model, batch)
        # One loss change for all ranks: each rank's batch contributes, the update is the same everywhere.
        losses = torch.tensor([float(loss.detach()), initial_loss], dtype=torch.float64, device=self._device)
        self._average_across_ranks([losses])
        initial_loss = float(losses[1])
        delta = float(losses[0]) - initial_loss
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * delta
        advantage = delta - self.baseline
        self.mask_optimizer.zero_grad(set_to_none=True)
        for name, logits in self.logits.items():
            with torch.enable_grad():
                log_prob = set_log_prob(logits, sampled[name], self.n, self.m).sum()
                (grad,) = torch.autograd.grad(log_prob, logits)
            logits.grad = advantage * grad
        self.mask_optimizer.step()
        if train_weights:
            self.model_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._average_model_grads()
            self.model_optimizer.step()
        self._set_matrix_masks(None)
        self.step_count += 1
        return {
            "loss": delta + initial_loss,
            "initial_loss": initial_loss,
            "advantage": advantage,
            "baseline": self.baseline,
        }

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        return {
            name: _targets.matrix_to_weight(module, top_n_mask(self.logits[name], self.n, self.m))
            for name, module in self.targets.items()
        }

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"logits.{name}": logits for name, logits in self.logits.items()}
        tensors.update({f"initial.{name}": mask for name, mask in self.initial.items()})
        return tensors

    @torch.no_grad()
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, logits in self.logits.items():
            logits.copy_(tensors[f"logits.{name}"])
            self.initial[name] = tensors[f"initial.{name}"].to(logits.device)

    def _extra_state(self) -> dict:
        return {"baseline": self.baseline, "baseline_decay": self.baseline_decay}

    def _check_extra_state(self, state: dict) -> None:
        if not is_finite_number(state["baseline"]):
            raise ValueError(f"MaskProLearner: state baseline must be a finite number, got {state['baseline']!r}")
        if not is_finite_number(state["baseline_decay"]) or not 0 <= state["baseline_decay"] < 1:
            raise ValueError(f"MaskProLearner: state baseline_decay must be in [0, 1), got {state['baseline_decay']!r}")

    def _load_extra_state(self, state: dict) -> None:
        self.baseline, self.baseline_decay = state["baseline"], state["baseline_decay"]
