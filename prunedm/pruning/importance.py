"""Channel importance for structural pruning: torch-pruning scorers chosen by name, and the gradient
pass that feeds the gradient-based ones (Taylor, and Diff-Pruning's timestep-thresholded Taylor)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from prunedm._optional import optional_import
from prunedm.diffusion import predict, sample_noise

if TYPE_CHECKING:
    import torch_pruning as tp

IMPORTANCES = ("random", "magnitude", "l1", "l2", "taylor", "diff-pruning")
GRADIENT_IMPORTANCES = ("taylor", "diff-pruning")
# Samples in one forward/backward of the gradient pass: 8 timesteps of the demo's 32 images. The memory of
# one pass of the paper's own batch (128 CIFAR images) and small enough for a CPU.
SAMPLES_PER_PASS = 256
# prune_channels' default bound on the timesteps of the gradient pass (every 10th of a 1000-step schedule).
MAX_TIMESTEPS = 100
# Below this many parameters the CPU gradient pass runs on one thread (gradient_pass_threads).
SMALL_MODEL_PARAMS = 20_000_000


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning scorer behind each name; each is a callable `importance(group) -> [channels]`.

    magnitude/l2: group L2 norm; l1: group L1 norm; taylor: |sum(w * dL/dw)| per channel (first-order
    Taylor of the loss change); diff-pruning: sum |w * dL/dw|, the per-weight form the Diff-Pruning
    paper accumulates over timesteps (the gradients come from `accumulate_denoising_gradients`)."""
    if name not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES} or an importance callable, got {name!r}")
    tp = optional_import("torch_pruning", f"importance={name!r}")
    if name == "random":
        return tp.importance.RandomImportance()
    if name in ("magnitude", "l2"):
        return tp.importance.MagnitudeImportance(p=2)
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "taylor":
        return tp.importance.TaylorImportance(multivariable=True)
    return tp.importance.TaylorImportance(multivariable=False)  # diff-pruning


@dataclass
class GradientPass:
    """What the gradient pass did: the timesteps it visited (every `stride`-th of the schedule) and the
    loss at each, in order, whether the threshold ended it, and how many forward/backward passes it took."""

    timesteps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    stride: int = 1
    passes: int = 0
    threads: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: how many timesteps fed the gradients and why the pass ended there."""
        if not self.timesteps:
            return "gradient pass: no timesteps"
        why = "to the end of the schedule"
        if self.stopped_early:
            why = f"threshold stop at t={self.timesteps[-1]}: loss {self.losses[-1]:.4g}, max {max(self.losses):.4g}"
        if self.stride > 1:
            why = f"every {self.stride}th timestep, {why}"
        return (
            f"gradient pass: {len(self.timesteps)} timesteps ({why}) in {self.passes} forward/backward passes, "
            f"{self.seconds:.1f} s on {self.threads or 'default'} thread(s)"
        )


def first_image_batch(data: Iterable | torch.Tensor) -> torch.Tensor:
    """The first batch of `data` (a tensor, or an iterable of tensors or of (images, ...) tuples/dicts)."""
    if isinstance(data, torch.Tensor):
        return data
    batch = next(iter(data), None)
    if isinstance(batch, Mapping):
        batch = batch.get("images", batch.get("sample", batch.get("pixel_values")))
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError("data must yield image tensors, (images, ...) tuples, or dicts with an 'images' key")
    return batch


def _expand_kwargs(model_kwargs: Mapping | None, batch: int, repeats: int) -> dict:
    """model_kwargs for a batch of `repeats` copies of `batch` samples: per-sample tensors (batch 1 or
    `batch`) are tiled, anything else (scalars, non-batched tensors) passes unchanged."""
    kwargs = {}
    for key, value in (model_kwargs or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] in (1, batch):
            value = value.expand(batch, *value.shape[1:]).repeat(repeats, *([1] * (value.dim() - 1)))
        kwargs[key] = value
    return kwargs


@contextlib.contextmanager
def _intra_op_threads(threads: int | None):
    """torch's intra-op thread count set for the block, then restored (None: leave it alone)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if threads:
            torch.set_num_threads(before)


def gradient_pass_threads(model: nn.Module, device: torch.device) -> int | None:
    """Intra-op threads for the gradient pass on CPU: one for small models, else torch's default.

    A small UNet's ops last microseconds, so each parallel region is mostly thread hand-off; when other
    processes share the cores, a descheduled worker stalls every region until it runs again, which made
    the demo's pass 10-20x slower under a 2-4x load (measured on 2 busy cores: 9.1 s per timestep on 2
    threads, 0.8 s on 1). One thread never waits on another."""
    if device.type != "cpu":
        return None
    params = sum(p.numel() for p in model.parameters())
    return 1 if params <= SMALL_MODEL_PARAMS else None


def accumulate_denoising_gradients(
    model: nn.Module,
    images: torch.Tensor,
    scheduler=None,
    threshold: float | None = None,
    timesteps: Iterable[int] | None = None,
    model_kwargs: Mapping | None = None,
    seed: int = 0,
    *,
    max_timesteps: int | None = None,
    samples_per_pass: int = SAMPLES_PER_PASS,
    threads: int | None | str = "auto",
) -> GradientPass:
    """Accumulate dL/dw of the noise-prediction loss summed over timesteps into `.grad`.

    As in Diff-Pruning (VainF/Diff-Pruning, ddpm_prune.py): one batch of clean images and one draw of
    noise, timesteps visited in increasing order (0, 1, ... by default), and with `threshold` the pass
    stops at the first timestep whose loss falls below threshold * (largest loss so far); that step's
    gradient is kept, as in the paper's code. Without a threshold every timestep contributes (Taylor).

    Unlike the paper's loop (one forward/backward per timestep), several timesteps share one pass:
    the batch holds `samples_per_pass // len(images)` copies of the images, each noised to its own
    timestep, and the backward runs on the sum of the per-timestep losses up to the stopping timestep.
    In eval mode every sample is independent (GroupNorm, attention within a sample), so the losses, the
    stopping point and the accumulated gradient are the paper's, up to float summation order.
    max_timesteps bounds the work (None: every timestep, as in the paper): when the schedule has more,
    the pass visits every s-th timestep (s = ceil(len / max_timesteps): 0, s, 2s, ...) and weights each
    gradient by s, a Riemann sum of the paper's sum over timesteps; the threshold is checked at those
    timesteps, so the stop lands at most s - 1 timesteps after the paper's. On the demo's digits DDPM
    (ratio 0.3, stop near t=480), every 10th timestep prunes 90% of the channels the full pass prunes,
    while the full pass with another noise seed shares only 75% with itself: the estimate's error is
    within the method's own sampling noise, for a tenth of the work.
    threads: intra-op threads for the pass ("auto": gradient_pass_threads, None: torch's setting).
    `model_kwargs` (e.g. encoder_hidden_states) of batch 1 or len(images) are tiled to the pass."""
    if scheduler is None:
        scheduler = optional_import("diffusers", "the gradient pass").DDPMScheduler(num_train_timesteps=1000)
    if timesteps is None:
        timesteps = range(scheduler.config.num_train_timesteps)
    timesteps = [int(t) for t in timesteps]
    stride = 1
    if max_timesteps is not None:
        if max_timesteps < 1:
            raise ValueError(f"max_timesteps must be at least 1 (or None for no cap), got {max_timesteps}")
        stride = max(1, -(-len(timesteps) // max_timesteps))
        timesteps = timesteps[::stride]
    if samples_per_pass < 1:
        raise ValueError(f"samples_per_pass must be at least 1, got {samples_per_pass}")
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    batch = images.shape[0]
    per_pass = max(1, samples_per_pass // batch)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = sample_noise(images, generator)
    if threads == "auto":
        threads = gradient_pass_threads(model, param.device)
    record = GradientPass()
    loss_max = 0.0
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    start_time = time.perf_counter()
    try:
        with _intra_op_threads(threads) as record.threads:
            for start in range(0, len(timesteps), per_pass):
                chunk = timesteps[start : start + per_pass]
                repeats = len(chunk)
                t_batch = torch.tensor(chunk, dtype=torch.long, device=images.device).repeat_interleave(batch)
                noise_pass = noise.repeat(repeats, *([1] * (noise.dim() - 1)))
                noisy = scheduler.add_noise(images.repeat(repeats, *([1] * (images.dim() - 1))), noise_pass, t_batch)
                kwargs = _expand_kwargs(model_kwargs, batch, repeats)
                prediction = predict(model, noisy, t_batch, kwargs)
                # The paper's epsilon loss, per timestep (summed below); its target is the noise whatever the scheduler.
                squared = F.mse_loss(prediction, noise_pass, reduction="none")
                losses = squared.reshape(repeats, -1).mean(dim=1)  # each row: F.mse_loss at one timestep
                used = repeats
                for i, value in enumerate(losses.detach().tolist()):  # one host read per pass
                    record.timesteps.append(chunk[i])
                    record.losses.append(value)
                    loss_max = max(loss_max, value)
                    if threshold is not None and value < threshold * loss_max:
                        record.stopped_early, used = True, i + 1
                        break
                # Each visited timestep stands for `stride` of the schedule, so .grad estimates the full sum.
                (losses[:used].sum() * stride).backward()
                record.passes += 1
                if record.stopped_early:
                    break
    finally:
        model.train(was_training)
    record.stride = stride
    record.seconds = time.perf_counter() - start_time
    return record
