"""The diffusion primitives every consumer shares: the model's prediction, the target it is trained toward,
the timestep sampler, the noise draw and the denoising loss, each taking the conditioning (a batch dict).

Below train, masks, pruning, cli and bench, so finetune and distill both import it (and not each other)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def predict(model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Mapping) -> torch.Tensor:
    """The model's prediction (noise, velocity, ...), for UNets, DiTs and MMDiTs alike (a learned-variance half is
    dropped); every key of `batch` but "images" (encoder_hidden_states, class_labels, pooled_projections,
    guidance) is passed to the model. An SD3 transformer is called by keyword; a Flux transformer on its packed
    2x2 latents with img_ids/txt_ids and timestep / 1000, as FluxPipeline calls it (unpacked after). An SDXL
    UNet's "text_embeds" and "time_ids" go into added_cond_kwargs (over any given there), as its pipeline passes
    them."""
    cond = {k: v for k, v in batch.items() if k != "images"}
    added = {k: cond.pop(k) for k in ("text_embeds", "time_ids") if k in cond}
    if added:
        cond["added_cond_kwargs"] = {**cond.get("added_cond_kwargs", {}), **added}
    if is_flux(model):
        _, channels, height, width = noisy.shape
        text = cond["encoder_hidden_states"]
        ids = {"img_ids": latent_image_ids(height // 2, width // 2).to(noisy),
               "txt_ids": torch.zeros(text.shape[1], 3).to(noisy)}  # fmt: skip
        if cond.get("guidance") is not None:
            cond["guidance"] = cond["guidance"].to(noisy.device, torch.float32)
        out = model(hidden_states=pack_latents(noisy), timestep=timesteps.to(noisy.dtype) / 1000, **ids, **cond)
        return unpack_latents(out[0] if isinstance(out, tuple) else out.sample, height, width)
    if is_sd3(model):
        out = model(hidden_states=noisy, timestep=timesteps, **cond)
    else:
        out = model(noisy, timesteps, **cond)
    out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
    if out.shape[1] == 2 * noisy.shape[1]:
        out = out[:, : noisy.shape[1]]
    return out


def _is(model: nn.Module, name: str) -> bool:
    return any(c.__name__ == name for c in type(model).__mro__)


def is_sd3(model: nn.Module) -> bool:
    """Whether `model` is an SD3 MMDiT (SD3Transformer2DModel)."""
    return _is(model, "SD3Transformer2DModel")


def is_flux(model: nn.Module) -> bool:
    """Whether `model` is a Flux transformer (FluxTransformer2DModel): it works on packed 2x2 latents."""
    return _is(model, "FluxTransformer2DModel")


def latent_shape(model: nn.Module) -> tuple[int, int]:
    """(channels, size) of the square latents (or images) `model` denoises: its in_channels and sample_size; a
    Flux transformer's in_channels are 4x its latent channels (packed 2x2) and it has no sample_size: FluxPipeline's
    default_sample_size 128 unless its config.json sets one."""
    config = model.config
    if is_flux(model):
        return config.in_channels // 4, config.get("sample_size") or 128
    return config.in_channels, config.sample_size


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: each 2x2 patch one token, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents must have even height and width, got {h}x{w}")
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents, to [B, C, height, width] (FluxPipeline._unpack_latents on latent sizes)."""
    b, _, channels = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """[height * width, 3] position ids (0, row, column) of packed tokens, as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` is a flow-matching one (FlowMatchEulerDiscreteScheduler: SD3, Flux)."""
    return type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def flow_sigmas(scheduler, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """sigma = timestep / num_train_timesteps (timesteps are sigma * 1000 on the flow-matching schedule; diffusers'
    recipes look sigma up in scheduler.sigmas, equal up to float rounding), shaped to broadcast over ndim dims."""
    sigmas = timesteps.float() / scheduler.config.num_train_timesteps
    return sigmas.view(-1, *([1] * (ndim - 1)))


def add_noise(scheduler, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noisy input at `timesteps`: scheduler.add_noise (DDPM-style q(x_t | x_0)), or for flow matching
    (1 - sigma) x0 + sigma noise, as diffusers' train_dreambooth_sd3 / _flux build it."""
    if is_flow_matching(scheduler):
        sigmas = flow_sigmas(scheduler, timesteps, images.dim()).to(images.device)
        return ((1.0 - sigmas) * images + sigmas * noise).to(images.dtype)
    return scheduler.add_noise(images, noise, timesteps)


def diffusion_target(scheduler, images, noise, timesteps) -> torch.Tensor:
    """What the model is trained to predict: the flow-matching velocity noise - x0, else by the scheduler's
    prediction_type."""
    if is_flow_matching(scheduler):
        return noise - images
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(images, noise, timesteps)
    if kind == "sample":
        return images
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


# Flow-matching timestep densities (diffusers' compute_density_for_timestep_sampling): train_dreambooth_sd3
# defaults to logit_normal (mean 0, std 1; SD3 paper, sec. 3.1), train_dreambooth_flux to "none" (uniform).
FLOW_DENSITIES = ("logit_normal", "uniform")


def sample_timesteps(scheduler, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n training timesteps drawn on the CPU (from `generator`, or the global RNG) and moved to `device`: the
    same draw on every device. Uniform over the scheduler's steps; for flow matching u from the density in
    scheduler.timestep_density (default logit_normal), then scheduler.timesteps[int(u * 1000)] as diffusers'
    SD3 / Flux recipes index their training scheduler (its shifted schedule); loss weighting is 1 there."""
    if not is_flow_matching(scheduler):
        return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    density = getattr(scheduler, "timestep_density", "logit_normal")
    if density == "logit_normal":
        u = torch.sigmoid(torch.normal(0.0, 1.0, (n,), generator=generator))
    elif density == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"timestep_density must be one of {', '.join(FLOW_DENSITIES)}, got {density!r}")
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.timesteps[indices].to(device)


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
    noisy = add_noise(scheduler, images, noise, timesteps)
    target = diffusion_target(scheduler, images, noise, timesteps)
    return F.mse_loss(predict(model, noisy, timesteps, cond), target)


def guided(cond_out: torch.Tensor, uncond_out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond_out + guidance_scale * (cond_out - uncond_out)
