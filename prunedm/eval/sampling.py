"""Sampling from a UNet, DiT or MMDiT (SD3, Flux) with a diffusers scheduler, flow matching included
(conditioned, with classifier-free guidance), and image grids (PNG) of the results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prunedm._atomic import atomic_file
from prunedm.diffusion import guided, is_flow_matching, is_flux, latent_shape, predict


@torch.no_grad()
def sample_images(
    model,
    scheduler,
    num_samples: int,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    conditions: dict[str, torch.Tensor] | None = None,
    null: dict[str, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    decode=None,
):
    """num_samples images in [-1, 1] from noise, `steps` denoising steps, deterministic for a seed.

    conditions: the model's per-sample conditioning ({"encoder_hidden_states": [N, L, D]}, {"class_labels":
    [N]}, or an MMDiT's embeddings with "pooled_projections" [N, P] and a Flux's "guidance" [N]); with `null`
    (one sample's null condition per key) and guidance_scale != 1, classifier-free guidance as diffusers'
    StableDiffusion(3)Pipeline and DiTPipeline run it: one batch of [cond; null], then uncond + scale * (cond -
    uncond) on the model's output (a learned-variance half is dropped). Flow-matching schedulers step on the
    predicted velocity with the timesteps the model's pipeline sets (set_timesteps).
    decode: latents -> images (a VAE's decoder) for a latent model, applied to each batch before the clamp."""
    if num_samples < 1 or steps < 1:
        raise ValueError(f"num_samples and steps must be >= 1, got {num_samples} and {steps}")
    guide = guidance_scale != 1.0
    if guide and not null:
        raise ValueError("guidance_scale != 1 needs the null condition (null=) to guide against")
    channels, size = latent_shape(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        x = torch.randn(n, channels, size, size, generator=gen).to(device)
        cond = {k: v[start : start + n].to(device) for k, v in (conditions or {}).items()}
        if guide:
            cond = {k: torch.cat([v, null[k].to(device, v.dtype).expand(n, *v.shape[1:])]) for k, v in cond.items()}
        set_timesteps(model, scheduler, steps, size)
        for t in tqdm(scheduler.timesteps, desc="sample", leave=False):
            x_in = torch.cat([x, x]) if guide else x
            x_in = scheduler.scale_model_input(x_in, t) if hasattr(scheduler, "scale_model_input") else x_in
            eps = predict(model, x_in, t.to(device).expand(x_in.shape[0]), cond)
            if guide:
                eps = guided(*eps.chunk(2), guidance_scale)
            x = scheduler.step(eps, t, x, generator=gen).prev_sample
        chunks.append((x if decode is None else decode(x)).clamp(-1, 1).cpu())
    return torch.cat(chunks)


def _shift(seq_len: int, config, max_shift: float) -> float:
    """mu of the resolution-dependent timestep shift: linear in the image's token count between (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift), as diffusers' calculate_shift (SD3 / Flux pipelines)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + base - slope * base_len


def set_timesteps(model, scheduler, steps: int, size: int) -> None:
    """scheduler.set_timesteps as the model's pipeline calls it: FluxPipeline with sigmas linspace(1, 1/steps)
    and the shift mu of its packed token count; StableDiffusion3Pipeline with mu only when the scheduler shifts
    dynamically; every other pipeline with the number of steps."""
    config = scheduler.config
    if is_flow_matching(scheduler) and is_flux(model):
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = _shift((size // 2) ** 2, config, 1.15)
        scheduler.set_timesteps(steps if sigmas is None else None, sigmas=sigmas, mu=mu)
    elif is_flow_matching(scheduler) and config.get("use_dynamic_shifting"):
        patch = model.config.patch_size
        scheduler.set_timesteps(steps, mu=_shift((size // patch) ** 2, config, 1.16))
    else:
        scheduler.set_timesteps(steps)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> None:
    """Write images in [-1, 1], [N, C, H, W] (C = 1 or 3), as one PNG grid."""
    from PIL import Image

    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.zeros(c, rows * (h + 2), columns * (w + 2))
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = image
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
