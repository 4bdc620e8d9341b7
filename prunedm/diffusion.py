"""The diffusion primitives every consumer shares: the model's prediction and the target it is trained toward.

Below train, masks, pruning, cli and bench, so finetune and distill both import it (and not each other)."""

from __future__ import annotations

import torch
from torch import nn


def predict(model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict) -> torch.Tensor:
    """The model's noise prediction, for UNets and DiTs alike (a learned-variance half is dropped)."""
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
