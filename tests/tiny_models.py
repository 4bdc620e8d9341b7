"""Tiny random-init configs of every diffusers model kind prunedm supports, with matching inputs,
shared by the tests (sparsify, mask learners, ...)."""

from __future__ import annotations

import diffusers
import torch

B = 2
# name -> (diffusers class, tiny config, inputs(generator) -> kwargs)
MODELS = {
    "UNet2DModel": (
        "UNet2DModel",
        dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
        lambda g: dict(sample=torch.randn(B, 3, 8, 8, generator=g), timestep=torch.tensor([3, 7])),
    ),
    "UNet2DConditionModel": (
        "UNet2DConditionModel",
        dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        lambda g: dict(sample=torch.randn(B, 4, 8, 8, generator=g), timestep=torch.tensor([3, 7]),
                       encoder_hidden_states=torch.randn(B, 5, 32, generator=g)),
    ),
    "DiTTransformer2DModel": (
        "DiTTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
             patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10, norm_num_groups=8),
        lambda g: dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), timestep=torch.tensor([3, 7]),
                       class_labels=torch.tensor([1, 2])),
    ),
    "SD3Transformer2DModel": (
        "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4),
        lambda g: dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g),
                       encoder_hidden_states=torch.randn(B, 5, 32, generator=g),
                       pooled_projections=torch.randn(B, 32, generator=g), timestep=torch.tensor([3, 7])),
    ),
    "FluxTransformer2DModel": (
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
        lambda g: dict(hidden_states=torch.randn(B, 16, 16, generator=g),
                       encoder_hidden_states=torch.randn(B, 5, 32, generator=g),
                       pooled_projections=torch.randn(B, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                       img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3)),
    ),
    "AutoencoderKL": (
        "AutoencoderKL",
        dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16),
        lambda g: dict(sample=torch.randn(B, 3, 16, 16, generator=g)),
    ),
}  # fmt: skip


def build(name, dtype=torch.float32, seed=0):
    cls_name, config, _ = MODELS[name]
    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**config).to(dtype).eval()


def inputs(name, dtype=torch.float32):
    kwargs = MODELS[name][2](torch.Generator().manual_seed(1))
    return {k: v.to(dtype) if v.is_floating_point() and k not in ("timestep", "img_ids", "txt_ids") else v
            for k, v in kwargs.items()}  # fmt: skip


def run(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out.sample if hasattr(out, "sample") else out


def tiny_pruning_unet(seed: int = 0) -> diffusers.UNet2DModel:
    """The small attention UNet the channel-pruning tests share (16/32 channels, 4 norm groups), in eval mode."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=4,
    ).eval()


def tiny_conditional_unet(seed: int = 0) -> diffusers.UNet2DConditionModel:
    """The small cross-attention UNet the channel-pruning tests share (32/64 channels, 4 heads), in eval mode."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,  # legacy meaning in UNet2DConditionModel: 4 heads
        norm_num_groups=8,
    ).eval()


def tiny_sdxl_unet(text_width: int = 16, pooled_width: int = 8, seed: int = 0) -> diffusers.UNet2DConditionModel:
    """A small UNet2DConditionModel in SDXL's layout and conditioning, in eval mode: a plain first down block, then
    cross-attention blocks of 2 linear-projection transformer layers over text of `text_width` (both CLIPs' widths
    side by side); addition_embed_type "text_time": pooled text embeds of `pooled_width` beside 6 time ids of 4
    sinusoidal features each."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=text_width,
        attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=pooled_width + 6 * 4,
    ).eval()  # fmt: skip
