"""Structural (EcoDiff-style) gates: one learnable gate per attention head and FFN hidden unit, trained so
the gated model's denoiser output stays close to the original's while a sparsity term closes gates.

Gates scale the input of each attention's output projection per head (`to_out[0]`, and `to_add_out`
for joint attention) and of each FFN's output layer per hidden unit (`ff.net[2]`), through forward
pre-hooks; in a Flux single-stream block, the attention's and proj_mlp's column ranges of proj_out.
Optional norm gates (`norms=`) scale LayerNorm/GroupNorm/RMSNorm output channels through forward hooks.
prunedm.structural.apply_structural_masks then removes what they closed."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunedm.masks.schedules import anneal
from prunedm.masks.state import StateFile
from prunedm.masks.targets import ModuleFilter
from prunedm.parallel import fsdp
from prunedm.parallel.fsdp import world_size
from prunedm.structural.gates import (
    HARD_CONCRETE_BETA,
    HARD_CONCRETE_GAMMA,
    HARD_CONCRETE_ZETA,
    _gumbel_two_class,
    hard_concrete_eval,
    hard_concrete_l0,
    hard_concrete_sample,
)
from prunedm.structural.heads import StructuralPruningReport, apply_structural_masks
from prunedm.structural.layout import StructuralLayout
from prunedm.structural.targets import find_structural_targets

GATE_TYPES = ("hard_concrete", "sigmoid", "gumbel_softmax")

# forward_fn(model, batch, noisy_latents, timesteps) -> the denoiser's output tensor.
ForwardFn = Callable[[nn.Module, object, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["FLUX_DEFAULT_GUIDANCE", "GATE_TYPES", "StructuralGateLearner", "denoiser_output"]


# ---- the denoiser call ----


def _split_batch(batch) -> tuple[torch.Tensor, dict]:
    if isinstance(batch, Mapping):
        keys = [k for k in ("latents", "sample", "hidden_states") if k in batch]
        if not keys:
            raise ValueError("a dict batch needs 'latents', 'sample' or 'hidden_states'")
        return batch[keys[0]], {k: v for k, v in batch.items() if k != keys[0]}
    if isinstance(batch, (list, tuple)):
        return batch[0], ({"class_labels": batch[1]} if len(batch) > 1 else {})
    return batch, {}


# Flux-dev's pipeline default guidance scale.
FLUX_DEFAULT_GUIDANCE = 3.5


def denoiser_output(model: nn.Module, batch, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The default forward_fn: model(noisy, timestep=timesteps, **conditioning).sample.

    batch: latents; (latents, class_labels); or a dict with "latents" ("sample", "hidden_states") and
    the model's conditioning kwargs (encoder_hidden_states, pooled_projections, img_ids, ...). A class-
    conditional DiT without labels gets class 0. Timesteps are DDPM's integers in [0, 1000); a
    FluxTransformer2DModel gets them as t / 1000 (its pipeline's scale; the model multiplies by 1000) and,
    when guidance-distilled and the batch has no "guidance", the default guidance 3.5."""
    _, kwargs = _split_batch(batch)
    config = getattr(model, "config", None)
    if "class_labels" not in kwargs and getattr(config, "num_embeds_ada_norm", None):
        kwargs["class_labels"] = torch.zeros(noisy.shape[0], dtype=torch.long, device=noisy.device)
    if type(model).__name__ == "FluxTransformer2DModel":
        timesteps = timesteps.float() / 1000
        if getattr(config, "guidance_embeds", False) and "guidance" not in kwargs:
            kwargs["guidance"] = torch.full((noisy.shape[0],), FLUX_DEFAULT_GUIDANCE, device=noisy.device)
    out = model(noisy, timestep=timesteps, **kwargs)
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- the learner ----


class _GateModule(nn.Module):
    """The gate logits as one module, so DistributedDataParallel can own their gradients: forward maps
    uniform noise per gate (and a temperature) to the sampled gates."""

    def __init__(self, logits: list[nn.Parameter], sample: Callable) -> None:
        super().__init__()
        self.logits = nn.ParameterList(logits)
        self._sample = sample

    def forward(self, noise: list[torch.Tensor], tau: float) -> list[torch.Tensor]:
        return [self._sample(logit, u, tau) for logit, u in zip(self.logits, noise)]


class StructuralGateLearner(StateFile):
    """Learn which attention heads, FFN hidden units (and, optionally, norm channels) of a diffusion
    model to remove.

    Each target (see find_structural_targets) gets one logit per head, hidden unit or channel. Gate types:
      hard_concrete  -- log_alpha; training samples stretched, clamped concrete gates (beta, gamma,
                        zeta); sparsity term is the expected L0; eval gate clamp(sigmoid(la)*1.2-0.1).
      sigmoid        -- gate sigmoid(logit / temperature); sparsity term is the mean gate.
      gumbel_softmax -- two-class straight-through Gumbel-softmax (hard 0/1 forward); sparsity term is
                        P(keep) = sigmoid(logit).
    In eval, sigmoid and gumbel_softmax gates are hard (logit > 0); hard_concrete's can lie in (0, 1)
    and apply_structural_masks folds them into the output projections.

    A step draws `timesteps_per_step` timesteps and noises per sample, runs the frozen model (gates
    off, no grad; or `teacher` if given) and the gated model at each, and minimises
        mean_k MSE(gated output_k, original output_k) + sparsity_weight * sparsity
    where sparsity averages each gate's term weighted by the parameters it controls (the expected
    fraction of gated parameters kept). Only the gates train. With gradient_checkpointing each
    timestep's gated forward is recomputed in backward, so activations of one timestep are held at a
    time. `norms` (regex or predicate) adds a gate per output channel of the LayerNorm/GroupNorm/
    RMSNorm modules it selects (see prunedm.structural.norms for which can be removed); a channel
    weighs in the sparsity term as the reader columns it removes, or as 1 where it is only a mask.

    Distributed: with a torch.distributed process group of more than one rank, the gates are sampled
    through a DistributedDataParallel wrapper of the gate logits (which broadcasts rank 0's logits at
    the first step and averages their gradients), every rank samples the same gates (the draws depend
    only on (seed, step)), and rank r's timesteps and noises are its slice of one draw over the global
    batch, its distance weighted by its share of that batch. So every rank ends each step with the
    same gates, equal (up to float rounding) to one process stepping on the ranks' batches concatenated
    in rank order. A model passed wrapped in DistributedDataParallel is unwrapped: its weights are
    frozen, so that wrapper has nothing to reduce.

    shard() (parallel: fsdp) shards the frozen model (and teacher) with FSDP2 per block instead; the gates
    (one per head or unit: a vanishing share of the parameters) and their Adam state stay whole on every rank,
    their gradients averaged over ranks as DDP would, with the same result.

    save()/load() (prunedm.masks.state.StateFile) keep the logits (learner.<target>), the Adam state and the
    global RNG streams: a resumed run continues bit-exactly; the gates being whole on every rank, a file one
    rank writes resumes on any number of ranks."""

    def __init__(
        self,
        model: nn.Module,
        *,
        gate_type: str = "hard_concrete",
        include: ModuleFilter = None,
        exclude: ModuleFilter = None,
        heads: bool = True,
        ffn: bool = True,
        sparsity_weight: float = 1e-2,
        lr: float = 0.1,
        init_logit: float = 3.0,
        temperature: float | tuple[float, float] = 1.0,
        total_steps: int | None = None,
        beta: float = HARD_CONCRETE_BETA,
        gamma: float = HARD_CONCRETE_GAMMA,
        zeta: float = HARD_CONCRETE_ZETA,
        timesteps_per_step: int = 2,
        num_train_timesteps: int = 1000,
        forward_fn: ForwardFn | None = None,
        teacher: nn.Module | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        norms: ModuleFilter = None,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {gate_type!r}")
        if not (gamma < 0 < 1 < zeta and beta > 0):
            raise ValueError(f"hard concrete needs gamma < 0, zeta > 1, beta > 0; got {gamma}, {zeta}, {beta}")
        if isinstance(temperature, tuple) and total_steps is None:
            raise ValueError("an annealed temperature (start, end) needs total_steps")
        if timesteps_per_step < 1:
            raise ValueError(f"timesteps_per_step must be >= 1, got {timesteps_per_step}")
        self.model, self.teacher, self.gate_type = model, teacher, gate_type
        self.targets, self.skipped = find_structural_targets(model, include, exclude, heads=heads, ffn=ffn, norms=norms)
        if not self.targets:
            raise ValueError(
                f"StructuralGateLearner: no attention, FeedForward or norm to gate (skipped: {self.skipped or 'none'})"
            )
        self.sparsity_weight, self.lr = float(sparsity_weight), float(lr)
        self.temperature, self.total_steps = temperature, total_steps
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.timesteps_per_step, self.num_train_timesteps = int(timesteps_per_step), int(num_train_timesteps)
        self.forward_fn = forward_fn or denoiser_output
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.seed, self.step_count = int(seed), 0

        device = next(model.parameters()).device
        self.logits: dict[str, nn.Parameter] = {
            name: nn.Parameter(torch.full((layout.units,), float(init_logit), device=device))
            for name, layout in self.targets.items()
        }
        self._cost = {name: float(layout.params_per_unit) for name, layout in self.targets.items()}
        self.optimizer = torch.optim.Adam(list(self.logits.values()), lr=self.lr)
        self._gate_module = _GateModule(list(self.logits.values()), self._sample_one)
        self._gate_runner: nn.Module | None = None  # the gate module, or its DDP wrapper (first step)
        self._active: dict[str, torch.Tensor] | None = None
        self._handles = []
        modules = dict(model.named_modules())
        for name, layout in self.targets.items():
            if layout.kind == "norm":
                self._handles.append(modules[name].register_forward_hook(self._make_norm_hook(name, layout)))
                continue
            for layer in layout.out_layers:
                self._handles.append(layer.register_forward_pre_hook(self._make_hook(name, layout)))
        self._frozen = [p for p in model.parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        self._scheduler = None
        self.sharded = False

    def shard(self, blocks=None) -> None:
        """parallel: fsdp (every rank calls it, before the first step): FSDP2 on the frozen model per block
        (default: prunedm.parallel.fsdp.find_blocks) and on the teacher; the gates stay whole on every rank."""
        if type(self).step is not StructuralGateLearner.step:  # e.g. EcoDiffLearner: its own backward
            raise ValueError(f"{type(self).__name__}: parallel 'fsdp' is not supported (its step); use ddp")
        if self.sharded or self.step_count:
            raise ValueError(f"{type(self).__name__}: shard() once, before the first step")
        mesh = fsdp.device_mesh(next(iter(self.logits.values())).device)
        fsdp.shard_model(self.model, mesh, blocks)
        if self.teacher is not None:
            fsdp.shard_model(self.teacher, mesh)
        self.sharded = True

    # hooks ---------------------------------------------------------------------------------------

    def _make_hook(self, name: str, layout: StructuralLayout):
        def scale_input(module, args):
            gates = self._active
            if gates is None or name not in gates:
                return None
            x = args[0]
            gate = gates[name].to(x.dtype)
            if layout.group > 1:
                gate = gate.repeat_interleave(layout.group)
            if gate.numel() != x.shape[-1]:  # a column range of a shared layer (Flux proj_out)
                after = x.shape[-1] - layout.out_offset - gate.numel()
                gate = torch.cat([gate.new_ones(layout.out_offset), gate, gate.new_ones(after)])
            return (x * gate, *args[1:])

        return scale_input

    def _make_norm_hook(self, name: str, layout: StructuralLayout):
        def scale_output(module, args, output):
            gates = self._active
            if gates is None or name not in gates:
                return None
            gate = gates[name].to(output.dtype)
            if layout.channel_dim == 1:
                gate = gate.view(1, -1, *([1] * (output.dim() - 2)))
            return output * gate

        return scale_output

    def use_gates(self, gates: Mapping[str, torch.Tensor] | None) -> None:
        """Make the model's forward apply these gates ({target: [units]}, float or bool); None: ungated."""
        self._active = (
            None if gates is None else {k: v.float() if v.dtype == torch.bool else v for k, v in gates.items()}
        )

    def remove(self) -> None:
        """Detach the hooks and unfreeze the model's parameters (the gates stay readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._active = [], None
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []

    # gates ---------------------------------------------------------------------------------------

    def current_temperature(self) -> float:
        """The sigmoid / Gumbel temperature at this step (annealed exponentially when given as a pair)."""
        if isinstance(self.temperature, tuple):
            start, end = self.temperature
            return anneal(start, end, self.step_count / max(self.total_steps, 1), "exp")
        return float(self.temperature)

    def _noise(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        eps = 1e-6
        return {
            name: torch.rand(p.shape, generator=generator).clamp(eps, 1 - eps).to(p.device)
            for name, p in self.logits.items()
        }

    def _sample_one(self, logit: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
        if self.gate_type == "hard_concrete":
            return hard_concrete_sample(logit, u, self.beta, self.gamma, self.zeta)
        if self.gate_type == "sigmoid":
            return torch.sigmoid(logit / tau)
        return _gumbel_two_class(logit, u, tau)

    def sample_gates(self, noise: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training gates (differentiable in the logits) for uniform noise per gate."""
        tau = self.current_temperature()
        return {name: self._sample_one(logit, noise[name], tau) for name, logit in self.logits.items()}

    @torch.no_grad()
    def gates(self) -> dict[str, torch.Tensor]:
        """The eval gates (float, in [0, 1]): what apply() removes (zeros) and folds (the rest)."""
        if self.gate_type == "hard_concrete":
            return {n: hard_concrete_eval(p, self.gamma, self.zeta).detach().clone() for n, p in self.logits.items()}
        return {name: (p > 0).float() for name, p in self.logits.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        """Hard masks: {target name: bool [heads], [hidden units] or [channels]}, True = kept."""
        return {name: gate > 0 for name, gate in self.gates().items()}

    def expected_kept(self) -> dict[str, torch.Tensor]:
        """Per gate, the sparsity term's measure of being kept: P(gate != 0), sigmoid gate, or P(keep)."""
        out = {}
        for name, logit in self.logits.items():
            if self.gate_type == "hard_concrete":
                out[name] = hard_concrete_l0(logit, self.beta, self.gamma, self.zeta)
            elif self.gate_type == "sigmoid":
                out[name] = torch.sigmoid(logit / self.current_temperature())
            else:
                out[name] = torch.sigmoid(logit)
        return out

    def sparsity(self) -> torch.Tensor:
        """The parameter-weighted mean of expected_kept: the expected fraction of gated params kept."""
        terms = self.expected_kept()
        total = sum(self._cost[n] * t.numel() for n, t in terms.items())
        return sum(self._cost[n] * t.sum() for n, t in terms.items()) / total

    # training ------------------------------------------------------------------------------------

    def _ddpm(self):
        if self._scheduler is None:
            from diffusers import DDPMScheduler

            self._scheduler = DDPMScheduler(num_train_timesteps=self.num_train_timesteps)
        return self._scheduler

    def _gated_forward(self, batch, noisy, timesteps, names, *gate_values):
        self._active = dict(zip(names, gate_values))
        try:
            return self.forward_fn(self.model, batch, noisy, timesteps)
        finally:
            self._active = None

    def step(self, batch) -> dict:
        """One gate update on `batch`; returns loss, distance (mean MSE to the original output),
        sparsity (the weighted expected kept fraction), kept (gates open in eval) and temperature."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step_count) % 2**63)
        latents, _ = _split_batch(batch)
        noise_gates = self._noise(generator)
        start, total, share = self._batch_share(latents.shape[0])
        rows = slice(start, start + latents.shape[0])
        draws = []
        for _ in range(self.timesteps_per_step):
            t = torch.randint(0, self.num_train_timesteps, (total,), generator=generator)[rows]
            noise = torch.randn((total, *latents.shape[1:]), generator=generator, dtype=latents.dtype)[rows]
            draws.append((t.to(latents.device), noise.to(latents.device)))
        was_training = self.model.training
        self.model.eval()  # dropout off: the gated and original outputs differ only by the gates
        self.optimizer.zero_grad(set_to_none=True)
        try:
            names = list(self.logits)
            values = self._runner()([noise_gates[n] for n in names], self.current_temperature())
            teacher = self.teacher if self.teacher is not None else self.model
            distance = 0.0
            for t, noise in draws:
                noisy = self._ddpm().add_noise(latents, noise, t)
                with torch.no_grad():
                    self._active = None
                    target = self.forward_fn(teacher, batch, noisy, t)
                if self.gradient_checkpointing:
                    pred = checkpoint(self._gated_forward, batch, noisy, t, names, *values, use_reentrant=False)
                else:
                    pred = self._gated_forward(batch, noisy, t, names, *values)
                distance = distance + F.mse_loss(pred.float(), target.float())
            distance = distance / self.timesteps_per_step
            sparsity = self.sparsity()
            loss = distance + self.sparsity_weight * sparsity
            # Under DDP the gradients are averaged over ranks: weighting each rank's distance by its
            # share of the global batch makes that average the gradient on the concatenated batch.
            (loss if share == 1.0 else share * distance + self.sparsity_weight * sparsity).backward()
            if self.sharded and world_size() > 1:  # what the DDP wrapper does otherwise: the mean over ranks
                for logit in self.logits.values():
                    torch.distributed.all_reduce(logit.grad)
                    logit.grad.div_(world_size())
            self.optimizer.step()
        finally:
            self._active = None
            self.model.train(was_training)
        self.step_count += 1
        kept = sum(int(m.sum()) for m in self.masks().values())
        return {
            "loss": float(loss.detach()),
            "distance": float(distance.detach()),
            "sparsity": float(sparsity.detach()),
            "kept": kept,
            "total": sum(p.numel() for p in self.logits.values()),
            "temperature": self.current_temperature(),
        }

    def _runner(self) -> nn.Module:
        """The gate module, wrapped in DistributedDataParallel when a process group has several ranks."""
        if self._gate_runner is None:
            self._gate_runner = self._gate_module
            if world_size() > 1 and not self.sharded:
                device = next(iter(self.logits.values())).device
                self._gate_runner = nn.parallel.DistributedDataParallel(
                    self._gate_module, device_ids=[device] if device.type == "cuda" else None
                )
        return self._gate_runner

    def _batch_share(self, size: int) -> tuple[int, int, float]:
        """(this rank's first row in the global batch, the global batch size, world * size / global)."""
        world = world_size()
        if world == 1:
            return 0, size, 1.0
        dist = torch.distributed
        device = next(iter(self.logits.values())).device
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=device))
        sizes = [int(s) for s in sizes]
        total = sum(sizes)
        return sum(sizes[: dist.get_rank()]), total, world * size / total

    def apply(self, hard: bool = False, replace_blocks: bool = True) -> StructuralPruningReport:
        """Remove the hooks, then the heads and units the eval gates close (folding the open gates'
        values in; hard=True keeps the open ones at 1 instead). The model is pruned in place. Sharded (shard()),
        apply gates() or masks() to an unsharded copy of the model with apply_structural_masks instead."""
        if self.sharded:
            raise ValueError(
                f"{type(self).__name__}: apply() needs the whole model; under parallel 'fsdp' pass gates() or "
                "masks() to prunedm.structural.apply_structural_masks on an unsharded copy (e.g. on rank 0)"
            )
        masks = self.masks() if hard else self.gates()
        self.remove()
        return apply_structural_masks(self.model, masks, replace_blocks=replace_blocks)

    # state ---------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        targets = {name: [layout.kind, layout.units] for name, layout in self.targets.items()}
        return {"class": type(self).__name__, "gate_type": self.gate_type, "targets": targets}

    def _check_meta(self, meta: dict) -> None:
        if "optimizers" not in meta and "optimizer" in meta:
            raise ValueError(
                f"{type(self).__name__}: state written by an older prunedm (gate.<name> tensors, one 'optimizer'); "
                "this version cannot resume it: learn the gates again"
            )
        super()._check_meta(meta)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.logits)

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.logits.items():
                p.copy_(tensors[name])

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}
