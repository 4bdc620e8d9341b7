"""Learned depth pruning (TinyFusion, Fang et al. 2024): per group of blocks, learnable logits over which k of
g blocks to keep, sampled per image with Gumbel-softmax while LoRA deltas learn to recover; EMA argmax decides.

Faithful by default (preset "official", VainF/TinyFusion prune_by_learning.py); deviations and why:
- The gates are plain logits trained beside hook-based LoRA deltas, not LoRALinear modules swapped into the model:
  the model is left exactly as it was (the search must not change weights or module types).
- The EMA covers the gate logits only (the official EMA averages every parameter, but the decision reads only
  the EMA gates, and the LoRA is discarded), initialised to the starting logits as the official update_ema(0).
- No bf16 autocast and no NaN-skip of a step: precision is the caller's choice here.
- Draws are keyed, not one global stream: the gates of step s by (seed, s), each sample's timestep, noise and
  label dropout by (seed, s, its row of the joined batch), so a sharded or resumed search draws what one
  uninterrupted process draws. Labels are dropped once per sample, in the loss, with the model's own probability
  (the original DiT's LabelEmbedder, which the official code trains through); diffusers' DiT in train mode would
  draw once per block from the global RNG, so its LabelEmbeddings run in eval mode during the search.
- The "short" preset (one pattern per batch, no scaling, rank-4 LoRA inside blocks, Adam 0.05, plain argmax)
  is prunedm's earlier search, kept for budgets of a few dozen steps where x100 logits at lr 1e-3 barely move."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunedm._atomic import remove_stale_temps
from prunedm._optional import optional_import
from prunedm.parallel import fsdp
from prunedm.pruning.depth import _block_input, _block_output, transformer_blocks
from prunedm.pruning.tinyfusion_loss import (
    class_dropout,
    denoising_loss,  # noqa: F401  (re-exported by prunedm.pruning)
    keyed_denoising_loss,
    label_embedders,
    stream_seed,
)
from prunedm.pruning.tinyfusion_state import load_search, save_search, search_tensors


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


def _options(preset: str, given: dict, lora, grad_clip, ema_decay) -> dict:
    """The search's settings: `given` where set, else TINYFUSION_PRESETS[preset]'s; ValueError for bad ones."""
    if preset not in TINYFUSION_PRESETS:
        raise ValueError(f"preset must be one of {sorted(TINYFUSION_PRESETS)}, got {preset!r}")
    chosen = TINYFUSION_PRESETS[preset]
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
    return opts


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
    data_parallel: bool = False,
    scheduler=None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> DepthSearchResult:
    """Learn which `keep_per_group` of every `group_size` consecutive blocks to keep (e.g. 1:2, 2:4, 7:14).

    Each step samples keep patterns per group (straight-through Gumbel-softmax of scaling x logits at a
    temperature annealed linearly from tau[0] to tau[1]); with per_sample each image of the batch gets its
    own pattern. Skipped blocks pass their input through. The loss (`loss_fn(model, batch)`, by default
    keyed_denoising_loss on `scheduler`, DDPM over 1000 steps unless given) trains the pattern logits and, as
    the recoverability term, LoRA deltas (scope `lora`: "all" Linears, "blocks" only, None: no LoRA), so a
    pattern is judged by how well the model recovers with it. The decision is the argmax of an EMA of the logits
    (ema_decay None: of the logits). Unset arguments come from TINYFUSION_PRESETS[preset] ("official" or
    "short"). `data` is cycled for `steps` batches (a sequence: batch step % len(data)). The model's weights are
    unchanged; the LoRA is discarded. on_step(done, loss) after each step.

    Randomness: the gate draws of step s come from a generator seeded by (seed, s); the default loss draws each
    sample's timestep, noise and class-label dropout keyed by (seed, s, its row in the joined batch)
    (prunedm.pruning.tinyfusion_loss). The model's own label dropout (DiT's LabelEmbedding, which in diffusers
    draws from the global RNG once per block) is off during the search: the default loss drops each sample's
    label once, with the model's probability, as the original DiT does; a custom loss_fn drops labels itself.

    shard (parallel: fsdp; every rank calls it with its own rows of the joined batch, all of one size n, rank r
    holding rows [r*n, (r+1)*n)): the model is sharded with FSDP2 per block (and left so: prune an unsharded
    copy with keep_indices); gate logits, LoRA and optimizer state stay whole on every rank, their gradients
    averaged over ranks. Per-image patterns are drawn over the joined batch and each rank takes its rows, and the
    default loss's draws are keyed by global row, so the search equals one process's on the joined batch up to
    float rounding of the reductions (a custom loss_fn: when it draws nothing per rank). data_parallel (parallel:
    ddp): the same with the whole model on every rank (nothing sharded; prune the model itself).

    checkpoint_dir with checkpoint_every k > 0: after every k-th and the last step the search state (logits,
    EMA, LoRA, optimizer state, step, losses) is written there (prunedm.pruning.tinyfusion_state; rank 0 writes,
    the state being whole on every rank). resume: continue from the newest checkpoint there (none: from the
    start), bit for bit as the uninterrupted run in one process, and on any number of ranks."""
    given = {"per_sample": per_sample, "scaling": scaling, "tau": tau, "lora_rank": lora_rank,
             "lora_alpha": lora_alpha, "optimizer": optimizer, "logits_lr": logits_lr, "lora_lr": lora_lr}  # fmt: skip
    opts = _options(preset, given, lora, grad_clip, ema_decay)
    if checkpoint_every < 0 or ((checkpoint_every or resume) and checkpoint_dir is None):
        raise ValueError(f"checkpoint_every={checkpoint_every}, resume={resume}: need checkpoint_every >= 0 and, "
                         "to checkpoint or resume, a checkpoint_dir")  # fmt: skip
    blocks = transformer_blocks(model, blocks_attr)
    if len(blocks) % group_size:
        raise ValueError(f"{len(blocks)} blocks do not split into groups of {group_size}")
    generator = torch.Generator().manual_seed(seed)  # the LoRA's initial values
    param = next(model.parameters())
    patterns = keep_patterns(group_size, keep_per_group).to(param.device)
    num_groups = len(blocks) // group_size
    logits = nn.Parameter(torch.zeros(num_groups, len(patterns), device=param.device))
    ema = logits.detach().clone()
    if shard and data_parallel:
        raise ValueError("shard (fsdp) and data_parallel (ddp) exclude each other: pick one")
    rank, world = (torch.distributed.get_rank(), fsdp.world_size()) if shard or data_parallel else (0, 1)
    dropout = class_dropout(model)
    if loss_fn is None and scheduler is None:
        scheduler = optional_import("diffusers", "learn_depth_keep").DDPMScheduler(num_train_timesteps=1000)

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
    state = search_tensors(logits, ema, lora_params)
    identity = {"blocks": len(blocks), "group_size": group_size, "keep_per_group": keep_per_group, "steps": steps,
                "seed": seed, "default_loss": loss_fn is None, **{k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in opts.items()}}  # fmt: skip

    start, losses = 0, []
    if resume:
        if rank == 0:
            remove_stale_temps(checkpoint_dir)  # what a killed writer left; only rank 0 writes there
        if world > 1:
            torch.distributed.barrier()
        found = load_search(Path(checkpoint_dir), state, optim, identity)
        if found is not None:
            start, losses = found
    was_training = model.training
    model.train()
    for embedder in label_embedders(model):  # labels are dropped (once per sample) by the default loss
        embedder.eval()
    try:
        batches = _batches(data, start)
        for step in range(start, steps):
            progress = step / max(1, steps - 1)
            temperature = opts["tau"][0] + (opts["tau"][1] - opts["tau"][0]) * progress
            scale = scale_range[0] + (scale_range[1] - scale_range[0]) * progress
            draws = torch.Generator().manual_seed(stream_seed(seed, step, -1, "gates"))
            if opts["per_sample"]:
                gates.gates = None
                gates.sampler = lambda n, t=temperature, s=scale, g=draws: sample_keep_gates(
                    logits, patterns, t, s, n * world, g
                )[rank * n : (rank + 1) * n]
            else:
                gates.gates = sample_keep_gates(logits, patterns, temperature, scale, None, draws)
            batch = next(batches)
            if loss_fn is None:
                first = rank * _batch_rows(batch)
                loss = keyed_denoising_loss(model, batch, scheduler, seed, step, first, dropout)
            else:
                loss = loss_fn(model, batch)
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
            done = step + 1
            if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                if rank == 0:
                    save_search(Path(checkpoint_dir), done, state, optim, losses, identity)
                if world > 1:  # no rank runs ahead of a checkpoint that is not yet complete
                    torch.distributed.barrier()
            if on_step is not None:
                on_step(done, losses[-1])
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


def _batch_rows(batch) -> int:
    """The number of samples in a batch (latents, a tuple or a dict, as keyed_denoising_loss takes it)."""
    if isinstance(batch, Mapping):
        batch = next((batch[k] for k in ("latents", "sample", "images") if k in batch), None)
        if batch is None:
            raise ValueError("batch: expected a dict with 'latents', 'sample' or 'images'")
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    return batch.shape[0]


def _batches(data: Iterable, start: int):
    """Batches from step `start` on: data[step % len(data)] for a sequence, else `data` cycled past `start`."""
    if isinstance(data, Sequence):
        if not len(data):
            raise ValueError("data is empty: pass at least one batch")
        return (data[step % len(data)] for step in itertools.count(start))
    return itertools.islice(_cycle(data), start, None)


def _cycle(data: Iterable):
    seen = 0
    while True:
        before = seen
        for batch in data:
            seen += 1
            yield batch
        if seen == before:
            raise ValueError(f"data ran out after {seen} batches: pass a re-iterable such as a list or DataLoader")
