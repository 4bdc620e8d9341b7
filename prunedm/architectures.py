"""The architectures prunedm is measured on, as diffusers constructor arguments (their config.json), built with
random init (offline stand-ins for the real checkpoints), and example forward inputs derived from a model's config."""

from __future__ import annotations

import torch

from prunedm._optional import optional_import

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
    # Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json): 859.52M params, 64x64 latents.
    "sd15-unet": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
        norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    )),
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
    diffusers = optional_import("diffusers", f"architecture {name!r}")

    class_name, kwargs = ARCHITECTURES[name]
    if seed is not None:
        torch.manual_seed(seed)
    cls = getattr(diffusers, class_name)
    if device is None:  # the caller's default device (e.g. an enclosing `with torch.device("meta")`)
        return cls(**kwargs)
    with torch.device(device):
        return cls(**kwargs)


TEXT_TOKENS = 77  # CLIP's prompt length: the text sequence of example inputs
FLUX_LATENT_SIZE = 64  # Flux's config has no sample size: a 512 px image's latent (1024 tokens after 2x2 packing)


def example_inputs_for(model, batch_size: int = 1, sample_size: int | tuple | None = None) -> dict:
    """Forward kwargs for `model` (UNet2DModel, UNet2DConditionModel, DiT, SD3, Flux), sized from its config.

    Tensors are seeded (the global generator is left alone) on the model's device and dtype (meta included);
    `sample_size` overrides the config's (latent) size. Raises ValueError "pass example_inputs: ..." naming the
    config field it lacks, or the model class it has no recipe for."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd wrapper
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if not hasattr(config, "get"):
        raise ValueError(f"pass example_inputs: cannot derive them from {cls} (it has no diffusers config)")
    param = next(iter(model.parameters()), torch.empty(0))
    generator = torch.Generator().manual_seed(0)

    def field(name):
        if config.get(name) is None:
            raise ValueError(f"pass example_inputs: cannot derive them from {cls} config ({name} missing)")
        return config.get(name)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=param.device, dtype=param.dtype)

    def ints(*shape, high=1):
        return torch.randint(0, max(int(high), 1), shape, generator=generator).to(param.device)

    def image(size):
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return randn(batch_size, field("in_channels"), height, width)

    kinds = {c.__name__ for c in type(model).__mro__}
    if "UNet2DModel" in kinds:
        inputs = {"sample": image(sample_size or field("sample_size")), "timestep": ints(batch_size, high=1000)}
        if config.get("class_embed_type") is not None:
            raise _underivable(cls, "class_embed_type", config["class_embed_type"])
        if config.get("num_class_embeds"):
            inputs["class_labels"] = ints(batch_size, high=config["num_class_embeds"])
        return inputs
    if "UNet2DConditionModel" in kinds:
        return _unet_condition_inputs(cls, config, field, randn, ints, image(sample_size or field("sample_size")))
    if "DiTTransformer2DModel" in kinds:
        return {
            "hidden_states": image(sample_size or field("sample_size")),
            "timestep": ints(batch_size, high=1000),
            "class_labels": ints(batch_size, high=field("num_embeds_ada_norm")),
        }
    if "SD3Transformer2DModel" in kinds:
        return {
            "hidden_states": image(sample_size or field("sample_size")),
            "encoder_hidden_states": randn(batch_size, TEXT_TOKENS, field("joint_attention_dim")),
            "pooled_projections": randn(batch_size, field("pooled_projection_dim")),
            "timestep": ints(batch_size, high=1000).to(param.dtype),
        }
    if "FluxTransformer2DModel" in kinds:
        size = sample_size or config.get("sample_size") or FLUX_LATENT_SIZE
        rows, cols = (size, size) if isinstance(size, int) else tuple(size)
        rows, cols = max(rows // 2, 1), max(cols // 2, 1)  # the pipeline packs 2x2 latent patches into a token
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        img_ids = torch.cat([torch.zeros(rows * cols, 1), grid.float()], 1).to(param.device, param.dtype)
        inputs = {
            "hidden_states": randn(batch_size, rows * cols, field("in_channels")),
            "encoder_hidden_states": randn(batch_size, TEXT_TOKENS, field("joint_attention_dim")),
            "pooled_projections": randn(batch_size, field("pooled_projection_dim")),
            "timestep": ints(batch_size, high=1000).to(param.dtype) / 1000,  # Flux takes t in [0, 1]
            "img_ids": img_ids,
            "txt_ids": torch.zeros(TEXT_TOKENS, 3, device=param.device, dtype=param.dtype),
        }
        if config.get("guidance_embeds"):
            inputs["guidance"] = torch.full((batch_size,), 3.5, device=param.device, dtype=param.dtype)
        return inputs
    raise ValueError(f"pass example_inputs: cannot derive them from {cls} config (no recipe for this model class)")


# UNet2DConditionModel's optional conditionings whose inputs the config sizes (the others take images, hints, ...).
_CONDITION_KINDS = {
    "encoder_hid_dim_type": (None, "text_proj"),
    "class_embed_type": (None, "timestep", "projection", "simple_projection"),
    "addition_embed_type": (None, "text", "text_time"),
}


def _underivable(cls: str, key: str, value) -> ValueError:
    return ValueError(
        f"pass example_inputs: cannot derive them from {cls} config ({key} {value!r} takes inputs it does not size)"
    )


def _unet_condition_inputs(cls, config, field, randn, ints, sample) -> dict:
    for key, derivable in _CONDITION_KINDS.items():
        if config.get(key) not in derivable:
            raise _underivable(cls, key, config[key])
    batch = sample.shape[0]
    text_dim = field("cross_attention_dim")
    text_dim = text_dim[0] if isinstance(text_dim, (list, tuple)) else text_dim
    if config.get("encoder_hid_dim_type") == "text_proj":
        text_dim = field("encoder_hid_dim")
    inputs = {
        "sample": sample,
        "timestep": ints(batch, high=1000),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS, text_dim),
    }
    class_type = config.get("class_embed_type")
    if class_type in ("projection", "simple_projection"):
        inputs["class_labels"] = randn(batch, field("projection_class_embeddings_input_dim"))
    elif class_type == "timestep":
        inputs["class_labels"] = ints(batch, high=1000)
    elif config.get("num_class_embeds"):
        inputs["class_labels"] = ints(batch, high=config["num_class_embeds"])
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeds and 6 size/crop numbers
        time_ids_dim = 6 * field("addition_time_embed_dim")
        inputs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, field("projection_class_embeddings_input_dim") - time_ids_dim),
            "time_ids": randn(batch, 6).abs(),
        }
    return inputs
