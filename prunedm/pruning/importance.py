"""Channel importance for structural pruning: torch-pruning scorers chosen by name, and the gradient
pass that feeds the gradient-based ones (Taylor, and Diff-Pruning's timestep-thresholded Taylor)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    import torch_pruning as tp

IMPORTANCES = ("random", "magnitude", "l1", "l2", "taylor", "diff-pruning")
GRADIENT_IMPORTANCES = ("taylor", "diff-pruning")


# The optional packages prunedm uses and the extra that installs each: a plain `pip install prunedm` has none.
EXTRAS = {"torch_pruning": "models", "diffusers": "models", "cleanfid": "models", "sklearn": "models"}
PACKAGE_NAMES = {"torch_pruning": "torch-pruning", "cleanfid": "clean-fid", "sklearn": "scikit-learn"}


def optional_import(module: str, feature: str):
    """`module`, imported; when it is not installed, an ImportError naming the extra that brings it
    ("prune_channels needs torch-pruning: pip install 'prunedm[models]'"), so a plain install imports
    prunedm and fails only in the feature that needs the package."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but something it imports is broken: show that, not a hint
        package = PACKAGE_NAMES.get(top, top)
        raise ImportError(f"{feature} needs {package}: pip install 'prunedm[{EXTRAS.get(top, 'models')}]'") from exc


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
    """What the gradient pass did: the timesteps it visited and the loss at each, in order."""

    timesteps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


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


def accumulate_denoising_gradients(
    model: nn.Module,
    images: torch.Tensor,
    scheduler=None,
    threshold: float | None = None,
    timesteps: Iterable[int] | None = None,
    model_kwargs: Mapping | None = None,
    seed: int = 0,
) -> GradientPass:
    """Accumulate dL/dw of the noise-prediction loss into `.grad`, one backward per timestep.

    As in Diff-Pruning: one batch of clean images and one draw of noise, timesteps visited in
    increasing order (0, 1, ... by default), and with `threshold` the pass stops at the first
    timestep whose loss falls below threshold * (largest loss so far); that step's gradient is kept,
    as in the paper's code. Without a threshold every timestep contributes (plain Taylor).
    `model_kwargs` (e.g. encoder_hidden_states) are expanded to the batch size when their batch is 1."""
    if scheduler is None:
        scheduler = optional_import("diffusers", "the gradient pass").DDPMScheduler(num_train_timesteps=1000)
    if timesteps is None:
        timesteps = range(scheduler.config.num_train_timesteps)
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    batch = images.shape[0]
    kwargs = {}
    for key, value in (model_kwargs or {}).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1 and batch > 1:
            value = value.expand(batch, *value.shape[1:])
        kwargs[key] = value
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator).to(images)
    record = GradientPass()
    loss_max = 0.0
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    try:
        for t in timesteps:
            t_batch = torch.full((batch,), int(t), dtype=torch.long, device=images.device)
            noisy = scheduler.add_noise(images, noise, t_batch)
            prediction = model(noisy, t_batch, **kwargs).sample
            loss = F.mse_loss(prediction[:, : noise.shape[1]], noise)
            loss.backward()
            value = float(loss.detach())
            record.timesteps.append(int(t))
            record.losses.append(value)
            loss_max = max(loss_max, value)
            if threshold is not None and value < threshold * loss_max:
                record.stopped_early = True
                break
    finally:
        model.train(was_training)
    return record
