"""TinyFusion's default loss: noise prediction at random timesteps, with class-label dropout done here (DiT's
classifier-free-guidance training) and every draw keyed by (seed, step, global sample index), so a rank holding
rows [r*n, (r+1)*n) of the joined batch draws exactly what one process draws for those rows."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prunedm._optional import optional_import
from prunedm.conditioning import null_class
from prunedm.diffusion import add_noise, diffusion_target, predict, sample_noise, sample_timesteps


def stream_seed(seed: int, step: int, index: int, tag: str = "sample") -> int:
    """A 63-bit seed for the draws of (seed, step, index) under `tag`: a hash, so that streams of nearby keys
    are unrelated and no (step, index) pair shares another's."""
    key = f"prunedm.tinyfusion:{tag}:{seed}:{step}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def label_embedders(model: nn.Module) -> list[nn.Module]:
    """The model's diffusers LabelEmbedding modules (DiT: one per block's adaLN embedder)."""
    return [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]


def class_dropout(model: nn.Module) -> tuple[float, int | None]:
    """(probability, null class) of the model's own class-label dropout (LabelEmbedding.dropout_prob; 0 and
    None for a model without one). ValueError when its label embeddings disagree on the probability."""
    probs = sorted({float(m.dropout_prob) for m in label_embedders(model)})
    if not probs or probs == [0.0]:
        return 0.0, None
    if len(probs) > 1:
        raise ValueError(f"{type(model).__name__}: its label embeddings drop labels with different probabilities "
                         f"{probs}; the search drops each sample's label once: set one dropout_prob")  # fmt: skip
    null = null_class(model)
    if null is None:
        raise ValueError(f"{type(model).__name__}: label dropout {probs[0]} but no null-class row to drop to")
    return probs[0], null


def _latents_and_cond(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """(latents, conditioning kwargs) of a batch: latents, (latents, class_labels), or a dict with "latents",
    "sample" or "images" and the model's conditioning (class_labels, encoder_hidden_states, ...). A
    class-conditioned DiT given no labels gets class 0."""
    if isinstance(batch, Mapping):
        name = next((k for k in ("latents", "sample", "images") if k in batch), None)
        if name is None:
            raise ValueError(f"batch: expected a dict with 'latents', 'sample' or 'images', got keys {sorted(batch)}")
        latents, cond = batch[name], {k: v for k, v in batch.items() if k not in ("latents", "sample", "images")}
    elif isinstance(batch, (list, tuple)):
        latents, cond = batch[0], ({"class_labels": batch[1]} if len(batch) > 1 else {})
    else:
        latents, cond = batch, {}
    if cond.get("class_labels") is None and getattr(getattr(model, "config", None), "num_embeds_ada_norm", None):
        cond["class_labels"] = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
    return latents, cond


def _mse(model, scheduler, latents, noise, timesteps, cond) -> torch.Tensor:
    noisy = add_noise(scheduler, latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return F.mse_loss(predict(model, noisy, timesteps, cond), target)


def denoising_loss(model: nn.Module, batch, scheduler=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise-prediction MSE for a DiT-style model at uniformly drawn timesteps, timesteps then noise from
    `generator` (or the global RNG); no label dropout. batch: as keyed_denoising_loss takes it."""
    if scheduler is None:
        scheduler = optional_import("diffusers", "denoising_loss").DDPMScheduler(num_train_timesteps=1000)
    latents, cond = _latents_and_cond(model, batch)
    timesteps = sample_timesteps(scheduler, latents.shape[0], latents.device, generator)
    return _mse(model, scheduler, latents, sample_noise(latents, generator), timesteps, cond)


def keyed_draws(n: int, shape, scheduler, seed: int, step: int, first_index: int = 0):
    """(timesteps [n], noise [n, *shape], uniforms [n]) on the CPU: sample first_index + i drawn from its own
    generator seeded by stream_seed(seed, step, first_index + i), timestep, then the label-dropout uniform,
    then the noise."""
    timesteps, uniforms, noise = [], [], []
    for index in range(first_index, first_index + n):
        generator = torch.Generator().manual_seed(stream_seed(seed, step, index))
        timesteps.append(sample_timesteps(scheduler, 1, "cpu", generator))
        uniforms.append(torch.rand(1, generator=generator))
        noise.append(torch.randn(tuple(shape), generator=generator))
    return torch.cat(timesteps), torch.stack(noise), torch.cat(uniforms)


def keyed_denoising_loss(
    model: nn.Module,
    batch,
    scheduler,
    seed: int,
    step: int,
    first_index: int = 0,
    dropout: tuple[float, int | None] | None = None,
) -> torch.Tensor:
    """Noise-prediction MSE with each sample's timestep, noise and label dropout keyed by (seed, step,
    first_index + its row) (keyed_draws): a rank passing first_index = rank * n draws what one process draws
    for those rows of the joined batch. Labels are dropped to the null class with `dropout` = (probability,
    null class) (default: class_dropout(model), the model's own); the model must not drop them again (the
    search runs its LabelEmbeddings in eval mode). batch: latents, (latents, class_labels) or a dict."""
    latents, cond = _latents_and_cond(model, batch)
    prob, null = class_dropout(model) if dropout is None else dropout
    timesteps, noise, uniforms = keyed_draws(latents.shape[0], latents.shape[1:], scheduler, seed, step, first_index)
    if prob > 0 and cond.get("class_labels") is not None:
        labels = cond["class_labels"]
        cond["class_labels"] = torch.where((uniforms < prob).to(labels.device), torch.full_like(labels, null), labels)
    return _mse(model, scheduler, latents, noise.to(latents), timesteps.to(latents.device), cond)
