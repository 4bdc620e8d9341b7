"""Finetuning of (pruned) diffusion models: the noise-prediction loss with the model's scheduler,
EMA weights, gradient clipping, mixed precision, DDP, atomic checkpoints and exact resume.

Randomness is a function of (seed, step, rank): batch order, noise, timesteps and the global RNG
(dropout) are re-seeded every step, so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from prunedm._atomic import remove_stale_temps, write_text_atomic
from prunedm._optional import optional_import
from prunedm.diffusion import add_noise, diffusion_target, predict, sample_timesteps
from prunedm.nn.modules import SparseConv2d, SparseLinear
from prunedm.nn.sparsify import nm_shape_problem
from prunedm.train import checkpoint as ckpt
from prunedm.train.distill import DistillConfig, DistillLoss

MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FinetuneConfig:
    """Finetuning settings; validate() checks every one against its range (below) before any work."""

    steps: int = 1000  # >= 1
    batch_size: int = 32  # >= 1; the global batch: each of W ranks takes batch_size / W
    lr: float = 1e-4  # > 0
    weight_decay: float = 0.0  # >= 0
    warmup_steps: int = 0  # >= 0: linear learning-rate warm-up
    ema_decay: float = 0.999  # [0, 1)
    # diffusers' EMA warm-up: the k-th update (k = 0, 1, ...) decays by min(ema_decay, (1 + k) / (10 + k)), so a
    # short run's EMA follows the trained weights instead of staying near the start (the first update copies).
    ema_warmup: bool = True
    grad_clip: float | None = 1.0  # > 0, or None: no clipping
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    checkpoint_every: int = 500  # >= 1
    keep_checkpoints: int = 2  # >= 1: the newest checkpoints kept on disk (resume needs one)
    log_every: int = 10  # >= 1
    seed: int = 0  # any integer
    progress: bool = True
    # Keep the zero pattern of every Linear/Conv2d weight that is exactly 2:4 sparse at the start
    # (a learned or magnitude mask): masked entries are re-zeroed after each step, in the EMA too.
    keep_sparsity: bool = False

    def validate(self, world_size: int = 1) -> None:
        """ValueError naming the first setting (as finetune.<name>) outside its range."""
        integers = {"steps": 1, "batch_size": 1, "warmup_steps": 0, "checkpoint_every": 1, "keep_checkpoints": 1,
                    "log_every": 1, "seed": None}  # fmt: skip
        for name, low in integers.items():
            value = getattr(self, name)
            if not _is_int(value) or (low is not None and value < low):
                wanted = "an integer" if low is None else f"an integer >= {low}"
                raise ValueError(f"finetune.{name} must be {wanted}, got {value!r}")
        for name, low, open_low in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("ema_decay", 0.0, False)):
            value = getattr(self, name)
            if not _is_number(value) or value < low or (open_low and value == low):
                raise ValueError(f"finetune.{name} must be a number {'>' if open_low else '>='} {low}, got {value!r}")
        if not self.ema_decay < 1.0:
            raise ValueError(f"finetune.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"finetune.grad_clip must be a number > 0 or null (no clipping), got {self.grad_clip!r}")
        for name in ("ema_warmup", "progress", "keep_sparsity"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"finetune.{name} must be true or false, got {getattr(self, name)!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"finetune.mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.batch_size % world_size:
            raise ValueError(
                f"finetune.batch_size must be a multiple of the {world_size} process(es), got {self.batch_size}"
            )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ema_decay_at(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of the EMA update that follows `updates` earlier ones: diffusers' warm-up
    min(decay, (1 + updates) / (10 + updates)), or the fixed decay without warm-up."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def ema_update_fn(decay: float, warmup: bool):
    """AveragedModel's multi_avg_fn for an EMA with (or without) warm-up. The update count comes from
    AveragedModel's n_averaged buffer, which checkpoints hold, so a resumed run continues the schedule."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        step_decay = ema_decay_at(decay, int(num_averaged), warmup)
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1 - step_decay)
        else:
            for ema_param, param in zip(ema_params, params):
                ema_param.copy_(ema_param * step_decay + param * (1 - step_decay))

    return update


@dataclass
class FinetuneResult:
    steps: int
    final_loss: float
    out_dir: Path
    ema_model: nn.Module
    history: list[dict] = field(default_factory=list)


def _batch_size_of(item) -> int:
    return (item["images"] if isinstance(item, dict) else item).shape[0]


class StepSampler:
    """Batch indices as a pure function of the step: epoch e visits a permutation seeded by (seed, e)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < batch_size:
            raise ValueError(f"data has {num_items} items, fewer than one batch of {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // batch_size

    def indices(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.batches_per_epoch)
        perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        batch = perm[within * self.batch_size : (within + 1) * self.batch_size]
        return batch[self.rank :: self.world_size]


def _collate(data, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return {"images": data[indices]}
    items = [data[int(i)] for i in indices]
    if isinstance(items[0], dict):
        return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}
    if isinstance(items[0], (tuple, list)):  # (image, label) datasets
        batch = {"images": torch.stack([item[0] for item in items])}
        if len(items[0]) > 1:
            batch["class_labels"] = torch.as_tensor([int(item[1]) for item in items])
        return batch
    return {"images": torch.stack(items)}


@torch.no_grad()
def nm_sparse_masks(model: nn.Module, n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """Weight-shaped bool masks (True = non-zero) of the model's Linear/Conv2d weights that are exactly
    n:m sparse along the input dim (convs in the [Cout, kh*kw*Cin] GEMM layout), keyed by module name;
    only layers that can be N:M targets (prunedm.nn.sparsify.nm_shape_problem) are looked at."""
    from prunedm import ops

    masks = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or nm_shape_problem(module, m) is not None:
            continue
        weight = module.weight.detach()
        matrix = ops.conv_weight_to_matrix(weight) if isinstance(module, nn.Conv2d) else weight
        if not matrix.dtype.is_floating_point:
            continue
        if ops.is_nm_sparse(matrix.float().cpu(), n, m):
            masks[name] = weight != 0
    return masks


@torch.no_grad()
def _reapply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, the weights outside each module's kept pattern."""
    if not masks:
        return
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.mul_(mask)


def _refuse_packed_layers(model: nn.Module) -> None:
    """ValueError when `model` holds packed 2:4 layers (SparseLinear / SparseConv2d): their weights are frozen
    buffers, so finetuning would train only the rest (0.45% of an SD UNet's weights) with normal-looking loss.
    Refused rather than trained through: the masked dense model with keep_sparsity trains every kept weight."""
    packed = [name for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    if packed:
        raise ValueError(
            f"finetune: the model is already sparsified ({len(packed)} packed 2:4 layer(s), first {packed[0]!r}): "
            "their weights are frozen buffers and would not train. Finetune the masked dense model with "
            "finetune.keep_sparsity=true (FinetuneConfig(keep_sparsity=True)), then sparsify"
        )


def _seed_for(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)


def finetune(
    model: nn.Module,
    data,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    scheduler=None,
    resume: bool = False,
    distill: DistillConfig | None = None,
    callback: Callable[[int, dict], Any] | None = None,
) -> FinetuneResult:
    """Finetune `model` on `data` (a tensor [N, C, H, W] or a dataset of images, (image, label) pairs or
    dicts with "images" and conditioning such as "class_labels"); writes out_dir/metrics.jsonl and
    out_dir/checkpoints/. With resume=True it continues from the latest checkpoint there, exactly; a newest
    checkpoint that is damaged or does not fit the model (sha256 or shape mismatch) is skipped with a warning for
    the next older one (still exact: the skipped steps are redone), and ValueError names it when none is usable.
    Under torch.distributed (e.g. torchrun) the model runs in DistributedDataParallel."""
    config = config or FinetuneConfig()
    _refuse_packed_layers(model)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    config.validate(world)
    if scheduler is None:
        scheduler = optional_import("diffusers", "finetune").DDPMScheduler(num_train_timesteps=1000)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    device = next(model.parameters()).device
    amp_dtype = MIXED_PRECISION[config.mixed_precision]

    sampler = StepSampler(len(data), config.batch_size, config.seed, rank, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.warmup_steps)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = AveragedModel(model, multi_avg_fn=ema_update_fn(config.ema_decay, config.ema_warmup), use_buffers=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16 and device.type == "cuda")
    distill_loss = DistillLoss(distill, model) if distill is not None else None

    sparse_masks = nm_sparse_masks(model) if config.keep_sparsity else {}
    start_step, history = 0, []
    if resume:
        if rank == 0:  # what a killed writer left; only rank 0 writes here
            remove_stale_temps(out_dir)
        found = _usable_checkpoint(ckpt_dir, model, ema, optimizer)
        if found is not None:
            tensors, state = found
            model.load_state_dict(tensors["model"])
            ema.load_state_dict(tensors["ema"])
            optimizer.load_state_dict(ckpt.optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"]))
            lr_schedule.load_state_dict(state["lr_schedule"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_step = state["step"]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json_atomic(out_dir / "finetune_config.json", asdict(config))
        history = metrics_up_to(metrics_path, start_step)

    train_model = nn.parallel.DistributedDataParallel(model) if distributed else model
    model.train()
    # A run resumed after its last step reports the loss it logged last.
    loss_value = float(history[-1]["loss"]) if history else math.nan
    bar = tqdm(total=config.steps, initial=start_step, disable=not config.progress or rank != 0, desc="finetune")
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        torch.manual_seed(_seed_for(config.seed, step, rank))  # dropout and anything else on the global RNG
        gen = torch.Generator().manual_seed(_seed_for(config.seed, step, rank) + 1)
        batch = {k: v.to(device) for k, v in _collate(data, sampler.indices(step)).items()}
        images = batch["images"]
        noise = torch.randn(images.shape, generator=gen).to(device, images.dtype)
        timesteps = sample_timesteps(scheduler, images.shape[0], device, gen)
        noisy = add_noise(scheduler, images, noise, timesteps)
        target = diffusion_target(scheduler, images, noise, timesteps)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if distill_loss is None:
                loss = F.mse_loss(predict(train_model, noisy, timesteps, batch).float(), target.float())
            else:
                loss = distill_loss(train_model, noisy, timesteps, batch, target, step=step)  # beta resumes exactly
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr_schedule.step()
        _reapply_masks(model, sparse_masks)
        ema.update_parameters(model)
        _reapply_masks(ema.module, sparse_masks)
        loss_value = float(loss.detach())
        done = step + 1
        bar.update(1)
        if rank == 0:
            log_step(config, metrics_path, history, bar, done, loss_value, optimizer, started)
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            opt_tensors, opt_rest = ckpt.optimizer_to_tensors(optimizer)
            state = {"optimizer": opt_rest, "lr_schedule": lr_schedule.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None}  # fmt: skip
            tensors = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt_tensors}
            ckpt.save_checkpoint(ckpt_dir, done, tensors, state, keep=config.keep_checkpoints)
        if callback is not None:
            callback(done, {"loss": loss_value})
    bar.close()
    if distributed:
        dist.barrier()
    return FinetuneResult(config.steps, loss_value, out_dir, ema.module, history)


def log_step(config, metrics_path: Path, history: list, bar, done: int, loss: float, optimizer, started: float) -> None:
    """After step `done`, every log_every steps and at the last: a record in history and metrics.jsonl."""
    if done % config.log_every and done != config.steps:
        return
    record = {"step": done, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
              "step_time_s": time.perf_counter() - started}  # fmt: skip
    history.append(record)
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{loss:.4f}")


def metrics_up_to(path: Path, step: int) -> list[dict]:
    """Records of an earlier run up to `step` (later ones belong to steps about to be redone); rewrites the
    file (whole or not at all). A line cut short by a kill is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _is_int(record.get("step")):
            records.append(record)
    kept = [r for r in records if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _usable_checkpoint(root: Path, model: nn.Module, ema: nn.Module, optimizer) -> tuple[dict, dict] | None:
    """(tensors, state) of the newest checkpoint under root that is whole and fits this model and optimizer;
    None without checkpoints. A newer one that cannot be used is skipped with a warning (resuming from an
    older one still reproduces the uninterrupted run); ValueError naming it when none can be used."""
    pointer = ckpt.read_pointer(root)
    candidates = ckpt.checkpoints_newest_first(root)
    if not candidates:
        if pointer is not None:
            raise ValueError(f"{root / ckpt.LATEST} names {pointer}, which is missing: delete it to start afresh")
        return None
    problems = []
    for path in candidates:
        try:
            tensors, state = ckpt.load_checkpoint(path, ["model", "ema", "optimizer"])
            _check_checkpoint(path, tensors, state, model, ema, optimizer)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(str(exc) if isinstance(exc, ValueError) else f"checkpoint {path}: malformed ({exc!r})")
            continue
        if problems:
            warnings.warn(f"resuming from {path.name}: {'; '.join(problems)}", stacklevel=3)
        return tensors, state
    raise ValueError(f"cannot resume: {problems[0]}; delete {root} to start the finetuning afresh, or use a new --out")


def _check_checkpoint(path: Path, tensors: dict, state: dict, model, ema, optimizer) -> None:
    """ValueError unless the checkpoint's tensors and state fit the model, its EMA and the optimizer."""
    if state["step"] != ckpt.step_of(path) or not _is_int(state["step"]):
        raise ValueError(f"checkpoint {path}: state.json says step {state['step']!r}")
    ckpt.check_tensors(f"checkpoint {path}: model", model.state_dict(), tensors["model"])
    ckpt.check_tensors(f"checkpoint {path}: ema", ema.state_dict(), tensors["ema"])
    optimizer_state = ckpt.optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"])
    ckpt.check_optimizer_state(f"checkpoint {path}", optimizer, optimizer_state)
    if not isinstance(state["lr_schedule"], dict) or state["lr_schedule"].get("last_epoch") != state["step"]:
        raise ValueError(f"checkpoint {path}: lr_schedule does not match step {state['step']}")
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise ValueError(f"checkpoint {path}: scaler is not a mapping")


__all__ = ["FinetuneConfig", "FinetuneResult", "StepSampler", "ema_decay_at", "ema_update_fn", "finetune",
           "metrics_up_to", "nm_sparse_masks", "predict"]  # fmt: skip
