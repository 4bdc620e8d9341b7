"""Sampling from a UNet or DiT with a diffusers scheduler (conditioned, with classifier-free guidance), and
image grids (PNG) of the results."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunedm._atomic import atomic_file
from prunedm.diffusion import guided, predict


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

    conditions: the model's per-sample conditioning ({"encoder_hidden_states": [N, L, D]} or {"class_labels":
    [N]}); with `null` (one sample's null condition per key) and guidance_scale != 1, classifier-free guidance
    as diffusers' StableDiffusionPipeline and DiTPipeline run it: one batch of [cond; null], then
    uncond + scale * (cond - uncond) on the noise prediction (a learned-variance half is dropped).
    decode: latents -> images (a VAE's decoder) for a latent model, applied to each batch before the clamp."""
    if num_samples < 1 or steps < 1:
        raise ValueError(f"num_samples and steps must be >= 1, got {num_samples} and {steps}")
    guide = guidance_scale != 1.0
    if guide and not null:
        raise ValueError("guidance_scale != 1 needs the null condition (null=) to guide against")
    config = model.config
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        x = torch.randn(n, config.in_channels, config.sample_size, config.sample_size, generator=gen).to(device)
        cond = {k: v[start : start + n].to(device) for k, v in (conditions or {}).items()}
        if guide:
            cond = {k: torch.cat([v, null[k].to(device, v.dtype).expand(n, *v.shape[1:])]) for k, v in cond.items()}
        scheduler.set_timesteps(steps)
        for t in tqdm(scheduler.timesteps, desc="sample", leave=False):
            x_in = scheduler.scale_model_input(torch.cat([x, x]) if guide else x, t)
            eps = predict(model, x_in, t.to(device).expand(x_in.shape[0]), cond)
            if guide:
                eps = guided(*eps.chunk(2), guidance_scale)
            x = scheduler.step(eps, t, x, generator=gen).prev_sample
        chunks.append((x if decode is None else decode(x)).clamp(-1, 1).cpu())
    return torch.cat(chunks)


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
