"""The diffusion primitives every consumer shares: the model's prediction, the target it is trained toward,
the timestep sampler, the noise draw and the denoising loss, each taking the conditioning (a batch dict).

Below train, masks, pruning, cli and bench, so finetune and distill both import it (and not each other)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def predict(model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Mapping) -> torch.Tensor:
    """The model's noise prediction, for UNets and DiTs alike (a learned-variance half is dropped); every key
    of `batch` but "images" (encoder_hidden_states, class_labels, ...) is passed to the model."""
    cond = {k: v for k, v in batch.items() if k != "images"}
    out = model(noisy, timesteps, **cond)
    out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
    if out.shape[1] == 2 * noisy.shape[1]:
        out = out[:, : noisy.shape[1]]
    return out


def diffusion_target(scheduler, images, noise, timesteps) -> torch.Tensor:
    """What the model is trained to predict, by the scheduler's prediction_type."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(images, noise, timesteps)
    if kind == "sample":
        return images
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


def sample_timesteps(scheduler, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n training timesteps, uniform over the scheduler's schedule, drawn on the CPU (from `generator`, or the
    global RNG) and moved to `device`: the same draw on every device."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)


def sample_noise(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like images: from `generator` (on the CPU, then moved), or without one from the
    global RNG of images' device."""
    if generator is None:
        return torch.randn_like(images)
    return torch.randn(images.shape, generator=generator).to(images)


def split_batch(batch) -> tuple[torch.Tensor, dict]:
    """(images, conditioning kwargs) of a batch: a tensor of images, or a dict with "images" and the model's
    conditioning (encoder_hidden_states, class_labels, ...)."""
    if isinstance(batch, Mapping):
        return batch["images"], {k: v for k, v in batch.items() if k != "images"}
    return batch, {}


def denoising_loss(
    model: nn.Module,
    scheduler,
    batch,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the model's prediction and the scheduler's target on `batch` (images, or a dict of images
    and conditioning) noised at random timesteps: noise first, then timesteps (unless given), from `generator`
    or the global RNG."""
    images, cond = split_batch(batch)
    noise = sample_noise(images, generator)
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, images.shape[0], images.device, generator)
    noisy = scheduler.add_noise(images, noise, timesteps)
    target = diffusion_target(scheduler, images, noise, timesteps)
    return F.mse_loss(predict(model, noisy, timesteps, cond), target)


def guided(cond_out: torch.Tensor, uncond_out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond_out + guidance_scale * (cond_out - uncond_out)
