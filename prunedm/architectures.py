"""The architectures prunedm is measured on, as diffusers constructor arguments (their config.json),
built with random init: offline stand-ins for the real checkpoints, used by the CLI, benches and tests."""

from __future__ import annotations

import torch

# (hidden size, depth, heads) of the DiT family (Peebles & Xie, Table 1).
DIT_SIZES = {"s-2": (384, 12, 6), "b-2": (768, 12, 12), "l-2": (1024, 24, 16), "xl-2": (1152, 28, 16)}


def _dit(size: str) -> tuple[str, dict]:
    hidden, depth, heads = DIT_SIZES[size]
    return "DiTTransformer2DModel", dict(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4, out_channels=8,
        num_layers=depth, sample_size=32, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    )  # fmt: skip


ARCHITECTURES: dict[str, tuple[str, dict]] = {
    # google/ddpm-cifar10-32: 35.75M params, 6.06G MACs at batch 1.
    "ddpm-cifar10-32": ("UNet2DModel", dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        norm_num_groups=32, resnet_time_scale_shift="default", add_attention=True,
    )),
    # Stable Diffusion 1.5's UNet (diffusers' UNet2DConditionModel defaults with CLIP-L text width).
    "sd15-unet": ("UNet2DConditionModel", dict(cross_attention_dim=768)),
    **{f"dit-{size}": _dit(size) for size in DIT_SIZES},
    # Small enough for tests and CPU demos.
    "tiny-unet": ("UNet2DModel", dict(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )),
}  # fmt: skip


def build(name: str, seed: int | None = None, device: str | torch.device | None = None):
    """A randomly initialised model of architecture `name` (on `device`, "meta" for shapes only)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    import diffusers

    class_name, kwargs = ARCHITECTURES[name]
    if seed is not None:
        torch.manual_seed(seed)
    cls = getattr(diffusers, class_name)
    if device is None:  # the caller's default device (e.g. an enclosing `with torch.device("meta")`)
        return cls(**kwargs)
    with torch.device(device):
        return cls(**kwargs)
