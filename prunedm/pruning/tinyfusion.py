"""Learned depth pruning (TinyFusion, Fang et al. 2024): per group of blocks, learnable logits over which k of
g blocks to keep, sampled per image with Gumbel-softmax while LoRA deltas learn to recover; EMA argmax decides.

Faithful by default (preset "official", VainF/TinyFusion prune_by_learning.py); deviations and why:
- The gates are plain logits trained beside hook-based LoRA deltas, not LoRALinear modules swapped into the model:
  the model is left exactly as it was (the search must not change weights or module types).
- The EMA covers the gate logits only (the official EMA averages every parameter, but the decision reads only
  the EMA gates, and the LoRA is discarded), initialised to the starting logits as the official update_ema(0).
- No bf16 autocast and no NaN-skip of a step: precision is the caller's choice here.
- The "short" preset (one pattern per batch, no scaling, rank-4 LoRA inside blocks, Adam 0.05, plain argmax)
  is prunedm's earlier search, kept for budgets of a few dozen steps where x100 logits at lr 1e-3 barely move."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunedm.diffusion import denoising_loss as shared_denoising_loss
from prunedm.diffusion import sample_timesteps
from prunedm.parallel import fsdp
from prunedm.pruning.depth import _block_input, _block_output, transformer_blocks
from prunedm.pruning.importance import optional_import


@dataclass
class DepthSearchResult:
    """keep_indices: the blocks to keep (pass to prune_depth); logits: [groups, patterns]."""

    keep_indices: list[int]
    patterns: torch.Tensor
    logits: torch.Tensor
    losses: list[float] = field(default_factory=list)
    decision_logits: torch.Tensor | None = None  # what the argmax was taken of: the EMA logits, or the logits

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
    # Timesteps before noise (the order this loss has always drawn in, so seeded runs stay the same).
    t = sample_timesteps(scheduler, n, latents.device, generator)
    batch = {"images": latents, **({"class_labels": labels} if labels is not None else {})}
    return shared_denoising_loss(model, scheduler, batch, generator, timesteps=t)


# Where each constant comes from. "official": VainF/TinyFusion prune_by_learning.py (its defaults and the
# paper's DiT-XL recipe); "short": prunedm's earlier search, kept for budgets of a few dozen steps.
TINYFUSION_PRESETS: dict[str, dict] = {
    "official": {
        "per_sample": True,  # the gate logits repeated per image: one keep pattern per sample
        "scaling": 100.0,  # logits x100 before the Gumbel-softmax (--scaling-range 1e2 1e2)
        "tau": (4.0, 0.1),  # --tau-range, linear over the steps
        "lora": "all",  # LoRALinear on every nn.Linear: blocks, adaLN, embedders, final layer
        "lora_rank": 8,
        "lora_alpha": 16.0,  # alpha = 2 * rank
        "optimizer": "adamw",  # weight decay 0
        "logits_lr": 1e-3,  # 10 x the base lr 1e-4
        "lora_lr": 1e-4,
        "grad_clip": 1.0,
        "ema_decay": 0.999,  # --ema-decay; the decision is the argmax of the EMA gates
    },
    "short": {
        "per_sample": False,
        "scaling": 1.0,
        "tau": (4.0, 0.1),
        "lora": "blocks",
        "lora_rank": 4,
        "lora_alpha": 4.0,
        "optimizer": "adam",
        "logits_lr": 0.05,
        "lora_lr": 1e-3,
        "grad_clip": None,
        "ema_decay": None,
    },
}

LORA_SCOPES = ("all", "blocks", None)


def sample_keep_gates(
    logits: torch.Tensor,
    patterns: torch.Tensor,
    tau: float,
    scaling: float = 1.0,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Straight-through Gumbel-softmax keep gates: [groups * group_size], or [batch_size, groups * group_size]
    with an independent pattern per sample (the logits repeated per image, as the official code does).
    The logits are multiplied by `scaling` first; forward values are exactly 0/1, gradients the soft ones."""
    shape = logits.shape if batch_size is None else (batch_size, *logits.shape)
    uniform = torch.rand(shape, generator=generator).clamp_(1e-10, 1 - 1e-10).to(logits)
    soft = ((logits * scaling - torch.log(-torch.log(uniform))) / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), patterns.shape[0]).to(soft)
    choice = hard - soft.detach() + soft  # straight-through: hard forward, soft gradient
    gates = choice @ patterns.to(soft)  # [..., groups, group_size]
    return gates.flatten(-2)


class DepthGates:
    """Forward hooks that blend each block's output with its input: x + gate * (block(x) - x). `gates` is
    None (every block on), [blocks], or [batch, blocks] (one pattern per sample); `sampler(batch)`, when set,
    draws the gates lazily at the first block of a forward whose batch size differs from the held one."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.gates: torch.Tensor | None = None
        self.sampler: Callable[[int], torch.Tensor] | None = None
        self.handles = [block.register_forward_hook(self._hook(i), with_kwargs=True) for i, block in enumerate(blocks)]

    def _hook(self, index: int):
        def gate(module, args, kwargs, output):
            x, y = _block_input(args, kwargs), _block_output(output)
            if self.sampler is not None and (self.gates is None or self.gates.shape[0] != x.shape[0]):
                self.gates = self.sampler(x.shape[0])
            if self.gates is None:
                return None
            g = self.gates[..., index]
            if g.dim() == 1:  # per sample: broadcast over tokens and channels
                g = g.view(-1, *([1] * (y.dim() - 1)))
            blended = x + g.to(y.dtype) * (y - x)
            return (blended, *output[1:]) if isinstance(output, (tuple, list)) else blended

        return gate

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _add_lora(model: nn.Module, blocks: nn.ModuleList, scope: str, rank: int, alpha: float, generator):
    """LoRA deltas as forward hooks: out + (alpha / rank) * up(down(x)), down uniform in +-1/sqrt(in) (the
    kaiming_uniform(a=sqrt(5)) bound of torchtune's LoRALinear), up zero. scope "all": every nn.Linear of the
    model; "blocks": those inside the transformer blocks. Returns (parameters, hook handles)."""
    root = model if scope == "all" else blocks
    params, handles = [], []
    for layer in root.modules():
        if not isinstance(layer, nn.Linear):
            continue
        bound = 1.0 / layer.in_features**0.5
        down = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
        down = nn.Parameter(down.to(layer.weight))
        up = nn.Parameter(torch.zeros(layer.out_features, rank).to(layer.weight))
        params += [down, up]
        handles.append(layer.register_forward_hook(_lora_hook(down, up, alpha / rank)))
    return params, handles


def _lora_hook(down: nn.Parameter, up: nn.Parameter, scale: float):
    return lambda module, args, output: output + scale * F.linear(F.linear(args[0], down), up)


def learn_depth_keep(
    model: nn.Module,
    data: Iterable,
    group_size: int = 2,
    keep_per_group: int = 1,
    steps: int = 100,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    *,
    preset: str = "official",
    per_sample: bool | None = None,
    scaling: float | tuple[float, float] | None = None,
    tau: tuple[float, float] | None = None,
    lora: str | None = "preset",
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    optimizer: str | None = None,
    logits_lr: float | None = None,
    lora_lr: float | None = None,
    grad_clip: float | None | str = "preset",
    ema_decay: float | None | str = "preset",
    blocks_attr: str = "transformer_blocks",
    seed: int = 0,
    shard: bool = False,
) -> DepthSearchResult:
    """Learn which `keep_per_group` of every `group_size` consecutive blocks to keep (e.g. 1:2, 2:4, 7:14).

    Each step samples keep patterns per group (straight-through Gumbel-softmax of scaling x logits at a
    temperature annealed linearly from tau[0] to tau[1]); with per_sample each image of the batch gets its
    own pattern. Skipped blocks pass their input through. The loss (`loss_fn(model, batch)`, by default
    `denoising_loss`) trains the pattern logits and, as the recoverability term, LoRA deltas (scope
    `lora`: "all" Linears, "blocks" only, None: no LoRA), so a pattern is judged by how well the model
    recovers with it. The decision is the argmax of an EMA of the logits (ema_decay None: of the logits).
    Unset arguments come from TINYFUSION_PRESETS[preset] ("official" or "short"). `data` is cycled for
    `steps` batches. The model's weights are unchanged; the LoRA is discarded.

    shard (parallel: fsdp; every rank calls it with its own batches, all of one size): the model is sharded
    with FSDP2 per block (and left so: prune an unsharded copy with keep_indices); gate logits, LoRA and
    optimizer state stay whole on every rank, their gradients averaged over ranks. Per-image patterns are drawn
    over the joined batch and each rank takes its rows, so with a deterministic loss_fn the search equals one
    process's on the joined batch (up to float rounding). The default loss draws each rank's noise and timesteps
    from its own stream (seeded by seed and rank): one process drawing for the joined batch interleaves them
    with the gate draws in one stream, which ranks cannot share without holding every rank's images. Draws the
    model itself makes in train mode (DiT's class-label dropout, from the global RNG) are each rank's own too."""
    if preset not in TINYFUSION_PRESETS:
        raise ValueError(f"preset must be one of {sorted(TINYFUSION_PRESETS)}, got {preset!r}")
    chosen = TINYFUSION_PRESETS[preset]
    given = {"per_sample": per_sample, "scaling": scaling, "tau": tau, "lora_rank": lora_rank,
             "lora_alpha": lora_alpha, "optimizer": optimizer, "logits_lr": logits_lr, "lora_lr": lora_lr}  # fmt: skip
    opts = {k: (chosen[k] if v is None else v) for k, v in given.items()}
    opts["lora"] = chosen["lora"] if lora == "preset" else lora
    opts["grad_clip"] = chosen["grad_clip"] if grad_clip == "preset" else grad_clip
    opts["ema_decay"] = chosen["ema_decay"] if ema_decay == "preset" else ema_decay
    if opts["lora"] not in LORA_SCOPES:
        raise ValueError(f"lora must be one of {LORA_SCOPES}, got {opts['lora']!r}")
    if opts["optimizer"] not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw', got {opts['optimizer']!r}")
    if opts["ema_decay"] is not None and not 0.0 <= opts["ema_decay"] < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {opts['ema_decay']}")
    blocks = transformer_blocks(model, blocks_attr)
    if len(blocks) % group_size:
        raise ValueError(f"{len(blocks)} blocks do not split into groups of {group_size}")
    generator = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    patterns = keep_patterns(group_size, keep_per_group).to(param.device)
    num_groups = len(blocks) // group_size
    logits = nn.Parameter(torch.zeros(num_groups, len(patterns), device=param.device))
    ema = logits.detach().clone()
    rank, world = (torch.distributed.get_rank(), fsdp.world_size()) if shard else (0, 1)
    if loss_fn is None:
        DDPMScheduler = optional_import("diffusers", "learn_depth_keep").DDPMScheduler  # noqa: N806

        scheduler = DDPMScheduler(num_train_timesteps=1000)
        noise_generator = generator if not shard else torch.Generator().manual_seed(seed + 7919 * (rank + 1))
        loss_fn = lambda m, b: denoising_loss(m, b, scheduler, noise_generator)  # noqa: E731

    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    gates = DepthGates(blocks)
    lora_params, handles = [], []
    if opts["lora"] is not None:
        lora_params, handles = _add_lora(model, blocks, opts["lora"], opts["lora_rank"], opts["lora_alpha"], generator)
    if shard:  # after the LoRA, which is made from the whole weights
        fsdp.shard_model(model, fsdp.device_mesh(param.device))
    groups = [{"params": [logits], "lr": opts["logits_lr"]}, {"params": lora_params, "lr": opts["lora_lr"]}]
    if opts["optimizer"] == "adamw":
        optim = torch.optim.AdamW(groups, weight_decay=0.0)
    else:
        optim = torch.optim.Adam(groups)
    scale_range = opts["scaling"] if isinstance(opts["scaling"], tuple) else (opts["scaling"],) * 2

    losses = []
    was_training = model.training
    model.train()
    try:
        batches = _cycle(data)
        for step in range(steps):
            progress = step / max(1, steps - 1)
            temperature = opts["tau"][0] + (opts["tau"][1] - opts["tau"][0]) * progress
            scale = scale_range[0] + (scale_range[1] - scale_range[0]) * progress
            if opts["per_sample"]:
                gates.gates = None
                gates.sampler = lambda n, t=temperature, s=scale: sample_keep_gates(
                    logits, patterns, t, s, n * world, generator
                )[rank * n : (rank + 1) * n]
            else:
                gates.gates = sample_keep_gates(logits, patterns, temperature, scale, None, generator)
            loss = loss_fn(model, next(batches))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # the mean over ranks of their batches' gradients: the joined batch's
                for p in (p for p in (logits, *lora_params) if p.grad is not None):  # every rank runs the same layers
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
                loss = fsdp.sum_over_ranks(loss) / world
            if opts["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_([logits, *lora_params], opts["grad_clip"])
            optim.step()
            if opts["ema_decay"] is not None:
                ema.mul_(opts["ema_decay"]).add_(logits.detach(), alpha=1 - opts["ema_decay"])
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        gates.remove()
        for handle in handles:
            handle.remove()
        for p, requires_grad in frozen.items():
            p.requires_grad_(requires_grad)

    decided = ema if opts["ema_decay"] is not None else logits.detach()
    best = patterns[decided.argmax(-1)]  # [groups, group_size]
    keep = [g * group_size + j for g in range(num_groups) for j in range(group_size) if best[g, j] > 0]
    return DepthSearchResult(keep, patterns.cpu(), logits.detach().cpu(), losses, decided.cpu())


def _cycle(data: Iterable):
    seen = 0
    while True:
        before = seen
        for batch in data:
            seen += 1
            yield batch
        if seen == before:
            raise ValueError(f"data ran out after {seen} batches: pass a re-iterable such as a list or DataLoader")
