"""EcoDiff (Zhang et al. 2024) on the structural gates: the end-to-end objective over the whole masked sampling
chain, time-step gradient checkpointing, bounded gate noise, an L1 penalty and keep-ratio binarisation.

Faithful by default (preset "sdxl", YaNgZhAnG-V5/EcoDiff configs/sdxl.yaml and scripts/train.py): from a fixed
seed and condition the gated model runs the whole deterministic sampling chain and its final latent is matched
(MSE) to the unpruned model's; hard concrete gates with masking_eps 0.5 (FLUX: 0.1); penalty beta 0.5 x L1 of
the logits (mean per layer, averaged over layers, summed over heads / FFN / norms); AdamW lr 0.1; init 3; the
backward runs one denoising step at a time from latents kept without grad. Deviations and why:
- One gate draw per training step serves every denoising step of the chain (the official hooks draw anew at
  each call): only then does the checkpointed backward equal the plain one, which the tests hold it to.
- The chain is DDIM (eta 0) over the DDPM schedule, or any object with `timesteps` and `step(output, i, x)`,
  not a diffusers pipeline: the model is a bare denoiser here; prompts enter as the batch's conditioning.
- Keep counts round(ratio * units) (official: int(), which can keep one fewer than the ratio asks).
- No torch.distributed for the end-to-end objective (the per-step autograd.grad bypasses DDP's reducer);
  the timestep objective ("timestep", the parent learner's) keeps it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prunedm.parallel.fsdp import world_size
from prunedm.structural.gates import hard_concrete_sample
from prunedm.structural.heads import StructuralPruningReport, apply_structural_masks
from prunedm.structural.learner import StructuralGateLearner, _split_batch

OBJECTIVES = ("end_to_end", "timestep")
PENALTIES = ("l1", "l0")
SCOPES = ("global", "per_layer")

# Official constants by model family; "short" is prunedm's timestep objective for small budgets.
ECODIFF_PRESETS: dict[str, dict] = {
    "sdxl": {"objective": "end_to_end", "masking_eps": 0.5, "penalty": "l1", "sparsity_weight": 0.5, "lr": 0.1,
             "init_logit": 3.0, "num_inference_steps": 50, "gradient_checkpointing": True},
    "flux": {"objective": "end_to_end", "masking_eps": 0.1, "penalty": "l1", "sparsity_weight": 0.5, "lr": 0.1,
             "init_logit": 3.0, "num_inference_steps": 50, "gradient_checkpointing": True},
    "short": {"objective": "timestep", "masking_eps": 0.0, "penalty": "l0", "sparsity_weight": 1e-2, "lr": 0.1,
              "init_logit": 3.0, "num_inference_steps": 50, "gradient_checkpointing": False},
}  # fmt: skip

__all__ = ["ECODIFF_PRESETS", "DDIMChain", "EcoDiffLearner", "binarize_keep_ratio"]


class DDIMChain:
    """Deterministic DDIM (eta 0) over a linear-beta DDPM schedule: `timesteps` evenly spaced from high to low,
    step(eps, i, x) -> x at the next timestep (alpha 1 after the last: the clean estimate)."""

    def __init__(self, num_inference_steps: int, num_train_timesteps: int = 1000) -> None:
        if not 0 < num_inference_steps <= num_train_timesteps:
            raise ValueError(f"num_inference_steps must lie in [1, {num_train_timesteps}], got {num_inference_steps}")
        betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)  # DDPM's linear schedule
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        stride = num_train_timesteps // num_inference_steps
        self.timesteps = [stride * i for i in reversed(range(num_inference_steps))]

    def step(self, eps: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        a = float(self.alphas_cumprod[self.timesteps[index]])
        a_next = float(self.alphas_cumprod[self.timesteps[index + 1]]) if index + 1 < len(self.timesteps) else 1.0
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


def binarize_keep_ratio(
    scores: Mapping[str, torch.Tensor], keep_ratio: float, scope: str = "global", kinds: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """0/1 masks keeping the highest-scoring round(keep_ratio * n) units: per target ("per_layer") or over all
    targets of one kind together ("global"; kinds maps target -> "heads"/"ffn"/"norm", as the official code
    ranks each hooker's gates apart). Ties keep the earlier unit (stable sort). {target: bool [units]}."""
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in [0, 1], got {keep_ratio}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    kinds = kinds or {}
    pools: dict[str, list[str]] = {}
    for name in scores:
        pools.setdefault(name if scope == "per_layer" else kinds.get(name, ""), []).append(name)
    masks = {}
    for names in pools.values():
        flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
        keep = round(keep_ratio * flat.numel())
        order = torch.sort(flat, descending=True, stable=True).indices
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[order[:keep]] = True
        for name, part in zip(names, kept.split([scores[n].numel() for n in names])):
            masks[name] = part.reshape(scores[name].shape).to(scores[name].device)
    return masks


class EcoDiffLearner(StructuralGateLearner):
    """StructuralGateLearner with EcoDiff's objective and options (see the module docstring).

    step(batch): batch gives the latent shape and the conditioning, as for the parent ((latents, labels), a
    dict, or latents). end_to_end: x_T ~ N(0, 1) from `sample_seed` (the same every step, as the official
    reseeding), the teacher (or the ungated model) runs the chain without grad, the gated model runs it with
    the step's gates, and distance = MSE(final latents). timestep: the parent's single-timestep objective.
    penalty "l1": sum over kinds of the mean over layers of mean |logit| (or of sigmoid(a * logit + b) with
    l1_sigmoid=(a, b), the configs' lambda_reg); "l0": the parent's parameter-weighted expected L0."""

    def __init__(
        self,
        model: nn.Module,
        *,
        preset: str = "sdxl",
        objective: str | None = None,
        masking_eps: float | None = None,
        penalty: str | None = None,
        l1_sigmoid: tuple[float, float] | None = None,
        num_inference_steps: int | None = None,
        chain=None,
        sample_seed: int = 0,
        **kwargs,
    ) -> None:
        if preset not in ECODIFF_PRESETS:
            raise ValueError(f"preset must be one of {sorted(ECODIFF_PRESETS)}, got {preset!r}")
        chosen = dict(ECODIFF_PRESETS[preset])
        for key, value in (("objective", objective), ("masking_eps", masking_eps), ("penalty", penalty),
                           ("num_inference_steps", num_inference_steps)):  # fmt: skip
            if value is not None:
                chosen[key] = value
        if chosen["objective"] not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {chosen['objective']!r}")
        if chosen["penalty"] not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {chosen['penalty']!r}")
        if not 0.0 <= chosen["masking_eps"] < 1.0:
            raise ValueError(f"masking_eps must lie in [0, 1), got {chosen['masking_eps']}")
        for key in ("sparsity_weight", "lr", "init_logit", "gradient_checkpointing"):
            kwargs.setdefault(key, chosen[key])
        kwargs.setdefault("gate_type", "hard_concrete")
        self.objective, self.masking_eps, self.penalty = (
            chosen["objective"],
            float(chosen["masking_eps"]),
            chosen["penalty"],
        )
        self.l1_sigmoid, self.sample_seed = l1_sigmoid, int(sample_seed)
        super().__init__(model, **kwargs)
        self.chain = chain if chain is not None else DDIMChain(chosen["num_inference_steps"], self.num_train_timesteps)
        # The official optimizer (weight decay 0.01, torch's default).
        self.optimizer = torch.optim.AdamW(list(self.logits.values()), lr=self.lr)

    def _sample_one(self, logit: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
        if self.gate_type == "hard_concrete":
            return hard_concrete_sample(logit, u, self.beta, self.gamma, self.zeta, eps=self.masking_eps)
        return super()._sample_one(logit, u, tau)

    def sparsity(self) -> torch.Tensor:
        if self.penalty == "l0":
            return super().sparsity()
        by_kind: dict[str, list[torch.Tensor]] = {}
        for name, logit in self.logits.items():
            value = logit if self.l1_sigmoid is None else torch.sigmoid(self.l1_sigmoid[0] * logit + self.l1_sigmoid[1])
            by_kind.setdefault(self.targets[name].kind, []).append(value.abs().mean())
        return sum(torch.stack(terms).mean() for terms in by_kind.values())

    # the end-to-end objective ------------------------------------------------------------------------

    def _denoise(self, model: nn.Module, batch, x: torch.Tensor, index: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.chain.timesteps[index], dtype=torch.long, device=x.device)
        out = self.forward_fn(model, batch, x, t)
        return self.chain.step(out[:, : x.shape[1]].to(x.dtype), index, x)  # a learned-variance half is dropped

    def _gated_step(self, batch, x: torch.Tensor, index: int, gates: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._active = dict(gates)
        try:
            return self._denoise(self.model, batch, x, index)
        finally:
            self._active = None

    def start_latents(self, batch) -> torch.Tensor:
        """x_T for `batch`: N(0, 1) of the batch latents' shape from sample_seed, the same every step."""
        latents, _ = _split_batch(batch)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(self.sample_seed))
        return noise.to(latents.device, latents.dtype)

    @torch.no_grad()
    def reference_latents(self, batch) -> torch.Tensor:
        """The final latents of the unpruned chain (the teacher's, else the ungated model's)."""
        self._active = None
        x, teacher = self.start_latents(batch), self.teacher if self.teacher is not None else self.model
        for index in range(len(self.chain.timesteps)):
            x = self._denoise(teacher, batch, x, index)
        return x

    def end_to_end_backward(self, batch, noise: Mapping[str, torch.Tensor], checkpointed: bool) -> torch.Tensor:
        """The final-latent distance under the gates drawn from `noise`, its gradient added to the logits'
        .grad: in one graph, or (checkpointed) one denoising step at a time from latents kept without grad."""
        target = self.reference_latents(batch).float()

        def draw():
            return self.sample_gates(noise)

        x, steps = self.start_latents(batch), range(len(self.chain.timesteps))
        if not checkpointed:
            gates = draw()
            for index in steps:
                x = self._gated_step(batch, x, index, gates)
            distance = F.mse_loss(x.float(), target)
            distance.backward()
            return distance.detach()
        kept = [x]
        with torch.no_grad():
            gates = draw()
            for index in steps:
                kept.append(self._gated_step(batch, kept[-1], index, gates))
        final = kept.pop().detach().requires_grad_(True)
        distance = F.mse_loss(final.float(), target)
        (grad,) = torch.autograd.grad(distance, final)
        params = list(self.logits.values())
        for index in reversed(steps):
            x_in = kept[index].detach().requires_grad_(index > 0)
            out = self._gated_step(batch, x_in, index, draw())  # gates recomputed: their graph is per step
            inputs = [x_in, *params] if index > 0 else params
            grads = torch.autograd.grad(out, inputs, grad_outputs=grad, allow_unused=True)
            if index > 0:
                grad, grads = grads[0], grads[1:]
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        return distance.detach()

    def step(self, batch) -> dict:
        """One gate update on `batch` (see the class docstring); returns loss, distance, sparsity, kept, total."""
        if self.objective == "timestep":
            return super().step(batch)
        if world_size() > 1:
            raise ValueError("EcoDiffLearner: the end_to_end objective runs in one process (use objective='timestep')")
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step_count) % 2**63)
        noise = self._noise(generator)
        was_training = self.model.training
        self.model.eval()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            distance = self.end_to_end_backward(batch, noise, self.gradient_checkpointing)
            sparsity = self.sparsity()
            (self.sparsity_weight * sparsity).backward()
            self.optimizer.step()
        finally:
            self._active = None
            self.model.train(was_training)
        self.step_count += 1
        return {
            "loss": float(distance + self.sparsity_weight * sparsity.detach()),
            "distance": float(distance),
            "sparsity": float(sparsity.detach()),
            "kept": sum(int(m.sum()) for m in self.masks().values()),
            "total": sum(p.numel() for p in self.logits.values()),
            "temperature": self.current_temperature(),
        }

    # the final mask ----------------------------------------------------------------------------------

    def keep_ratio_masks(self, keep_ratio: float, scope: str = "global") -> dict[str, torch.Tensor]:
        """0/1 masks at exactly round(keep_ratio * units) kept, ranked by logit (see binarize_keep_ratio)."""
        kinds = {name: layout.kind for name, layout in self.targets.items()}
        return binarize_keep_ratio(self.logits, keep_ratio, scope, kinds)

    def apply(
        self, hard: bool = False, replace_blocks: bool = True, keep_ratio: float | None = None, scope: str = "global"
    ) -> StructuralPruningReport:
        """With keep_ratio: remove the hooks, then every unit outside keep_ratio_masks (the rest kept at 1).
        Without: the parent's apply (eval gates folded, or hard)."""
        if keep_ratio is None:
            return super().apply(hard=hard, replace_blocks=replace_blocks)
        masks = self.keep_ratio_masks(keep_ratio, scope)
        self.remove()
        return apply_structural_masks(self.model, masks, replace_blocks=replace_blocks)
