"""Learned depth pruning (TinyFusion, Fang et al. 2024): per group of consecutive blocks, learnable logits
over which k of g blocks to keep, sampled with Gumbel-softmax while a LoRA delta on the kept blocks
learns to recover; the keep list is the most likely pattern of each group."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunedm.pruning.depth import _block_input, _block_output, transformer_blocks
from prunedm.pruning.importance import optional_import


@dataclass
class DepthSearchResult:
    """keep_indices: the blocks to keep (pass to prune_depth); logits: [groups, patterns]."""

    keep_indices: list[int]
    patterns: torch.Tensor
    logits: torch.Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(-1)


def keep_patterns(group_size: int, keep: int) -> torch.Tensor:
    """Every way to keep `keep` of `group_size` blocks, as 0/1 rows: [C(group_size, keep), group_size]."""
    if not 0 < keep <= group_size:
        raise ValueError(f"need 0 < keep <= group_size, got keep={keep}, group_size={group_size}")
    rows = [
        [1.0 if i in kept else 0.0 for i in range(group_size)]
        for kept in itertools.combinations(range(group_size), keep)
    ]
    return torch.tensor(rows)


def denoising_loss(model: nn.Module, batch, scheduler=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise-prediction MSE for a DiT-style model at uniformly drawn timesteps.

    batch: latents, (latents, class_labels), or a dict with "latents"/"sample" and "class_labels".
    The first `latents.shape[1]` output channels are the noise estimate (DiT also predicts variance)."""
    DDPMScheduler = optional_import("diffusers", "denoising_loss").DDPMScheduler  # noqa: N806

    scheduler = scheduler if scheduler is not None else DDPMScheduler(num_train_timesteps=1000)
    labels = None
    if isinstance(batch, Mapping):
        latents, labels = batch.get("latents", batch.get("sample")), batch.get("class_labels")
    elif isinstance(batch, (list, tuple)):
        latents, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        latents = batch
    n = latents.shape[0]
    if labels is None and getattr(getattr(model, "config", None), "num_embeds_ada_norm", None):
        labels = torch.zeros(n, dtype=torch.long, device=latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noisy = scheduler.add_noise(latents, noise, t)
    kwargs = {"class_labels": labels} if labels is not None else {}
    prediction = model(noisy, timestep=t, **kwargs).sample
    return F.mse_loss(prediction[:, : latents.shape[1]], noise)


def learn_depth_keep(
    model: nn.Module,
    data: Iterable,
    group_size: int = 2,
    keep_per_group: int = 1,
    steps: int = 100,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    *,
    tau: tuple[float, float] = (4.0, 0.1),
    logits_lr: float = 0.05,
    lora_rank: int = 4,
    lora_lr: float = 1e-3,
    blocks_attr: str = "transformer_blocks",
    seed: int = 0,
) -> DepthSearchResult:
    """Learn which `keep_per_group` of every `group_size` consecutive blocks to keep (e.g. 1:2, 2:4, 7:14).

    Each step samples one keep pattern per group (straight-through Gumbel-softmax at a temperature
    annealed linearly from tau[0] to tau[1]); skipped blocks pass their input through. The loss
    (`loss_fn(model, batch)`, by default `denoising_loss`) trains the pattern logits and, as the
    recoverability term, rank-`lora_rank` LoRA deltas on every Linear of every block, so a pattern
    is judged by how well the model recovers with it, not only by its loss before finetuning.
    `data` is cycled for `steps` batches. The model's weights are unchanged; the LoRA is discarded."""
    blocks = transformer_blocks(model, blocks_attr)
    if len(blocks) % group_size:
        raise ValueError(f"{len(blocks)} blocks do not split into groups of {group_size}")
    generator = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    patterns = keep_patterns(group_size, keep_per_group).to(param.device)
    num_groups = len(blocks) // group_size
    logits = nn.Parameter(torch.zeros(num_groups, len(patterns), device=param.device))
    gates = torch.ones(len(blocks), device=param.device)
    if loss_fn is None:
        DDPMScheduler = optional_import("diffusers", "learn_depth_keep").DDPMScheduler  # noqa: N806

        scheduler = DDPMScheduler(num_train_timesteps=1000)
        loss_fn = lambda m, b: denoising_loss(m, b, scheduler, generator)  # noqa: E731

    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    lora_params, handles = [], []

    def gate_hook(index):
        def gate(module, args, kwargs, output):
            x, y = _block_input(args, kwargs), _block_output(output)
            return x + gates[index] * (y - x)

        return gate

    def lora_hook(down, up):
        return lambda module, args, output: output + F.linear(F.linear(args[0], down), up)

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(gate_hook(i), with_kwargs=True))
        for layer in block.modules():
            if isinstance(layer, nn.Linear):
                down = torch.randn(lora_rank, layer.in_features, generator=generator) / layer.in_features**0.5
                down = nn.Parameter(down.to(layer.weight))
                up = nn.Parameter(torch.zeros(layer.out_features, lora_rank).to(layer.weight))
                lora_params += [down, up]
                handles.append(layer.register_forward_hook(lora_hook(down, up)))
    optimizer = torch.optim.Adam([{"params": [logits], "lr": logits_lr}, {"params": lora_params, "lr": lora_lr}])

    losses = []
    was_training = model.training
    model.train()
    try:
        batches = _cycle(data)
        for step in range(steps):
            temperature = tau[0] + (tau[1] - tau[0]) * step / max(1, steps - 1)
            uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1 - 1e-10).to(logits)
            soft = ((logits - torch.log(-torch.log(uniform))) / temperature).softmax(-1)
            hard = F.one_hot(soft.argmax(-1), len(patterns)).to(soft)
            choice = hard - soft.detach() + soft  # straight-through: hard forward, soft gradient
            gates = (choice @ patterns).flatten()
            loss = loss_fn(model, next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        for p, requires_grad in frozen.items():
            p.requires_grad_(requires_grad)

    best = patterns[logits.detach().argmax(-1)]  # [groups, group_size]
    keep = [g * group_size + j for g in range(num_groups) for j in range(group_size) if best[g, j] > 0]
    return DepthSearchResult(keep, patterns.cpu(), logits.detach().cpu(), losses)


def _cycle(data: Iterable):
    seen = 0
    while True:
        before = seen
        for batch in data:
            seen += 1
            yield batch
        if seen == before:
            raise ValueError(f"data ran out after {seen} batches: pass a re-iterable such as a list or DataLoader")
