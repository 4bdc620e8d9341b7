"""finetune under FSDP2 (parallel: fsdp): the model fully_shard-ed per block then at the root, AdamW over the
sharded parameters, gradients clipped by their norm over every shard, keep_sparsity masks and the EMA held as
each rank's rows, checkpoints through torch.distributed.checkpoint (prunedm.parallel.checkpoint: sharded,
atomic, resumable on any number of ranks) and the final EMA model gathered tensor by tensor on rank 0.

Noise, timesteps and batch order are drawn for the global batch from (seed, step) and each rank takes its
items (rank::world), so the run does not depend on the number of ranks: one process (no torch.distributed)
runs the same path unsharded, and its weights match a sharded run's up to the order of float sums. Dropout
draws from the global RNG seeded per (seed, step, rank). fp16 is refused; bf16 is FSDP2's MixedPrecisionPolicy
(bf16 gathered parameters and compute, fp32 sharded parameters, optimizer state and gradient reduction) under
torch.distributed, autocast in one process.

Masked KD (distill): the teacher is sharded per block like the student (forward only, gathered block by block)
and every rank computes DistillLoss on its items; its terms are means over equal shares of the joined batch, so
the ranks' mean is the joined batch's loss and FSDP's averaged gradients are its gradients. The one term that
is not a plain mean (output_mask_sigma: divided by the kept-element count) divides by the joined batch's count
over the ranks."""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunedm._atomic import remove_stale_temps
from prunedm._optional import optional_import
from prunedm.diffusion import add_noise, diffusion_target, predict, sample_timesteps
from prunedm.parallel import fsdp
from prunedm.train import checkpoint as ckpt
from prunedm.train.distill import DistillLoss
from prunedm.train.finetune import (
    MIXED_PRECISION,
    FinetuneConfig,
    FinetuneResult,
    StepSampler,
    _collate,
    _refuse_packed_layers,
    _seed_for,
    ema_decay_at,
    log_step,
    metrics_up_to,
    nm_sparse_masks,
)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view sharing its storage); a plain tensor itself."""
    return tensor.to_local() if fsdp._is_dtensor(tensor) else tensor


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (what AveragedModel(use_buffers=True) averages)."""
    return {**dict(model.named_parameters()), **{k: v for k, v in model.named_buffers() if v is not None}}


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no storage): the frame the
    gathered EMA is put into, so rank 0 never holds a second full copy of the weights."""
    memo: dict[int, Any] = {}
    for tensor in _state(model).values():
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _local_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """keep_sparsity masks (module name -> full weight mask) as parameter name -> this rank's rows of it."""
    modules = dict(model.named_modules())
    out = {}
    for name, mask in masks.items():
        local, first = fsdp.local_rows(modules[name].weight)
        out[f"{name}.weight"] = mask[first : first + local.shape[0]].clone()
    return out


@torch.no_grad()
def _reapply(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        _local(tensors[name]).mul_(mask)


@torch.no_grad()
def _clip_grads(params: list[nn.Parameter], max_norm: float) -> None:
    """clip_grad_norm_ over the shards: the 2-norm of every rank's gradient rows, then each scaled by
    min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    squares = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    norm = fsdp.sum_over_ranks(squares).sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], live: dict[str, torch.Tensor], updates: int, config) -> None:
    """AveragedModel's update with finetune's decay schedule on each rank's rows: the first copies."""
    for name, average in ema.items():
        target, value = _local(average), _local(live[name]).detach()
        if updates == 0:
            target.copy_(value)
            continue
        decay = ema_decay_at(config.ema_decay, updates, config.ema_warmup)
        if target.is_floating_point():
            target.lerp_(value, 1 - decay)
        else:
            target.copy_(target * decay + value * (1 - decay))


def _gather_into(skeleton: nn.Module, tensors: dict[str, torch.Tensor], keep: bool) -> None:
    """Every tensor gathered whole (collective, one at a time) and, where `keep`, put into `skeleton`."""
    modules = dict(skeleton.named_modules())
    for name, tensor in tensors.items():
        full = tensor.full_tensor() if fsdp._is_dtensor(tensor) else tensor
        if not keep:
            continue
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        full = full.detach()
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(full, requires_grad=module._parameters[leaf].requires_grad)
        else:
            module._buffers[leaf] = full


def _checkpoint_tensors(live, ema, optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach() for k, v in live.items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    params = optimizer.param_groups[0]["params"]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optimizer.{index}.{key}"] = value
    return tensors


def _save(root: Path, done: int, live, ema, optimizer, lr_schedule, keep: int) -> None:
    from prunedm.parallel import checkpoint as sharded  # torch.distributed.checkpoint: seconds to import

    meta = {"step": done, "lr_schedule": lr_schedule.state_dict(),
            "param_groups": optimizer.state_dict()["param_groups"]}  # fmt: skip
    path = root / f"step-{done:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    sharded.save(path, _checkpoint_tensors(live, ema, optimizer), json.loads(json.dumps(meta)))
    if _rank() == 0:
        ckpt.mark_latest(root, path, done, keep)


def _resume(root: Path, live, ema, optimizer, lr_schedule) -> int:
    """Load the newest usable sharded checkpoint under root into the run (any number of ranks); its step, 0
    without one. A newer one that cannot be used is skipped with a warning; ValueError when none can be."""
    from prunedm.parallel import checkpoint as sharded

    candidates = ckpt.checkpoints_newest_first(root)
    if not candidates:
        return 0
    sharded.init_optimizer_state(optimizer)
    problems = []
    for path in candidates:
        try:
            meta = sharded.read_meta(path)
            if meta.get("step") != ckpt.step_of(path):
                raise ValueError(f"{path}: prunedm.json says step {meta.get('step')!r}")
            current = _checkpoint_tensors(live, ema, optimizer)
            fresh = {key: torch.empty_like(value) for key, value in current.items()}
            sharded.load(path, fresh)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        with torch.no_grad():
            for key, value in current.items():
                value.copy_(fresh[key])
        for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
            group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})
        lr_schedule.load_state_dict(meta["lr_schedule"])
        if problems:
            warnings.warn(f"resuming from {path.name}: {'; '.join(problems)}", stacklevel=3)
        return meta["step"]
    raise ValueError(
        f"cannot resume under parallel 'fsdp': {problems[0]}; delete {root} to start the finetuning afresh, "
        "or use a new --out"
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def finetune_sharded(
    model: nn.Module,
    data,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    scheduler=None,
    resume: bool = False,
    distill=None,
    callback: Callable[[int, dict], Any] | None = None,
) -> FinetuneResult:
    """prunedm.train.finetune under FSDP2 (every rank calls it; one process without torch.distributed runs it
    unsharded). `model` is sharded in place. The result's ema_model is the gathered EMA on rank 0 and a meta-
    device frame on the other ranks; checkpoints are torch.distributed.checkpoint directories under
    out_dir/checkpoints (the DDP path's safetensors checkpoints are not read here, nor these there). Resuming
    on the rank count that saved is bit-exact; on another count the gradient sums change order (close, not equal)."""
    config = config or FinetuneConfig()
    if config.mixed_precision == "fp16":
        raise ValueError(
            "finetune.mixed_precision 'fp16' under parallel 'fsdp' needs a sharded gradient scaler, which is not "
            "supported: use 'bf16' or 'no'"
        )
    _refuse_packed_layers(model)
    rank, world = _rank(), fsdp.world_size()
    config.validate(world)
    if scheduler is None:
        scheduler = optional_import("diffusers", "finetune").DDPMScheduler(num_train_timesteps=1000)
    out_dir = Path(out_dir)
    ckpt_dir, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    device = next(model.parameters()).device
    amp_dtype = MIXED_PRECISION[config.mixed_precision]

    masks = nm_sparse_masks(model) if config.keep_sparsity else {}
    skeleton = _meta_skeleton(model)
    distill_loss = DistillLoss(distill, model) if distill is not None else None
    if dist.is_available() and dist.is_initialized():
        mesh = fsdp.device_mesh(device)
        fsdp.shard_model(model, mesh, compute_dtype=amp_dtype)
        if distill_loss is not None:
            fsdp.shard_model(distill.teacher, mesh, compute_dtype=amp_dtype)
            distill_loss.count = lambda kept: fsdp.sum_over_ranks(kept) / world
        amp_dtype = None  # bf16: FSDP2's MixedPrecisionPolicy in place of autocast
    masks = _local_masks(model, masks)
    live = _state(model)
    ema = {name: tensor.detach().clone() for name, tensor in live.items()}
    sampler = StepSampler(len(data), config.batch_size, config.seed)  # the global batch; this rank's items below
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.warmup_steps)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    start_step, history = 0, []
    if resume:
        if rank == 0:
            remove_stale_temps(out_dir)
        start_step = _resume(ckpt_dir, live, ema, optimizer, lr_schedule)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(out_dir / "finetune_config.json", {**asdict(config), "parallel": "fsdp"})
        history = metrics_up_to(metrics_path, start_step)

    model.train()
    loss_value = float(history[-1]["loss"]) if history else math.nan
    bar = tqdm(total=config.steps, initial=start_step, disable=not config.progress or rank != 0, desc="finetune")
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        torch.manual_seed(_seed_for(config.seed, step, rank))  # dropout and anything else on the global RNG
        gen = torch.Generator().manual_seed(_seed_for(config.seed, step, 0) + 1)  # the same on every rank
        indices = sampler.indices(step)
        batch = {k: v.to(device) for k, v in _collate(data, indices[rank::world]).items()}
        images = batch["images"]
        noise = torch.randn((len(indices), *images.shape[1:]), generator=gen)[rank::world].to(device, images.dtype)
        timesteps = sample_timesteps(scheduler, len(indices), device, gen)[rank::world]
        noisy = add_noise(scheduler, images, noise, timesteps)
        target = diffusion_target(scheduler, images, noise, timesteps)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if distill_loss is None:
                loss = F.mse_loss(predict(model, noisy, timesteps, batch).float(), target.float())
            else:
                loss = distill_loss(model, noisy, timesteps, batch, target, step=step)  # beta resumes exactly
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            _clip_grads(list(model.parameters()), config.grad_clip)
        optimizer.step()
        lr_schedule.step()
        _reapply(live, masks)
        _ema_update(ema, live, step, config)
        _reapply(ema, masks)
        loss_value = float(fsdp.sum_over_ranks(loss.detach().float()) / world)  # the joined batch's loss
        done = step + 1
        bar.update(1)
        if rank == 0:
            log_step(config, metrics_path, history, bar, done, loss_value, optimizer, started)
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save(ckpt_dir, done, live, ema, optimizer, lr_schedule, config.keep_checkpoints)
        if callback is not None:
            callback(done, {"loss": loss_value})
    bar.close()
    if distill_loss is not None:
        distill_loss.remove()
    _gather_into(skeleton, ema, keep=rank == 0)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return FinetuneResult(config.steps, loss_value, out_dir, skeleton, history)
