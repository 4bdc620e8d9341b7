"""The built-in architectures are the real models' shapes."""

from __future__ import annotations

import diffusers
import pytest
import tiny_models
import torch

from prunedm.architectures import ARCHITECTURES, FLUX_LATENT_SIZE, TEXT_TOKENS, build, example_inputs_for


def test_ddpm_cifar10_has_the_published_size():
    model = build("ddpm-cifar10-32", seed=0)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_builds_on_meta(name):
    model = build(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    with torch.device("meta"):
        assert next(build(name).parameters()).device.type == "meta"


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'unet9'"):
        build("unet9")


# runwayml/stable-diffusion-v1-5 unet/config.json (the fields diffusers' defaults do not already fix).
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768, "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-5,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "act_fn": "silu",
}  # fmt: skip


def test_sd15_unet_is_the_real_config_and_size():
    model = build("sd15-unet", device="meta")
    for key, value in SD15_UNET_CONFIG.items():
        assert tuple(model.config[key]) == value if isinstance(value, tuple) else model.config[key] == value, key
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_sd15_unet_example_inputs_from_its_config_run_on_meta():
    model = build("sd15-unet", device="meta")
    inputs = example_inputs_for(model, batch_size=2)
    assert {k: list(v.shape) for k, v in inputs.items()} == {
        "sample": [2, 4, 64, 64], "timestep": [2], "encoder_hidden_states": [2, TEXT_TOKENS, 768],
    }  # fmt: skip
    with torch.no_grad():
        assert list(model(**inputs).sample.shape) == [2, 4, 64, 64]


# (the first input's shape, the output's shape) for tiny_models' inputs derived from the config at batch 1.
TINY_SHAPES = {
    "UNet2DModel": ([1, 3, 8, 8], [1, 3, 8, 8]),
    "UNet2DConditionModel": ([1, 4, 8, 8], [1, 4, 8, 8]),
    "DiTTransformer2DModel": ([1, 4, 8, 8], [1, 8, 8, 8]),
    "SD3Transformer2DModel": ([1, 4, 8, 8], [1, 4, 8, 8]),
    "FluxTransformer2DModel": ([1, (FLUX_LATENT_SIZE // 2) ** 2, 16], [1, (FLUX_LATENT_SIZE // 2) ** 2, 16]),
}


@pytest.mark.parametrize("name", sorted(TINY_SHAPES))
def test_example_inputs_for_every_model_kind_run(name, one_thread_module):
    model = tiny_models.build(name)
    state = torch.random.get_rng_state()
    inputs = example_inputs_for(model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    again = example_inputs_for(torch.compile(model))
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    first, out_shape = TINY_SHAPES[name]
    assert list(next(iter(inputs.values())).shape) == first
    out = tiny_models.run(model, inputs)
    assert list(out.shape) == out_shape and torch.isfinite(out).all()


def test_example_inputs_for_class_and_sdxl_conditioning(one_thread_module):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8, layers_per_block=1,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                 num_class_embeds=10)  # fmt: skip
    inputs = example_inputs_for(unet, batch_size=3, sample_size=(8, 16))
    assert list(inputs["sample"].shape) == [3, 3, 8, 16] and inputs["class_labels"].dtype == torch.long
    assert list(tiny_models.run(unet, inputs).shape) == [3, 3, 8, 16]
    config = dict(tiny_models.MODELS["UNet2DConditionModel"][1])
    sdxl = diffusers.UNet2DConditionModel(**config, addition_embed_type="text_time", addition_time_embed_dim=8,
                                          projection_class_embeddings_input_dim=32 + 6 * 8)  # fmt: skip
    inputs = example_inputs_for(sdxl)
    assert {k: list(v.shape) for k, v in inputs["added_cond_kwargs"].items()} == {
        "text_embeds": [1, 32], "time_ids": [1, 6],
    }  # fmt: skip
    assert list(tiny_models.run(sdxl, inputs).shape) == [1, 4, 8, 8]


def test_example_inputs_for_says_pass_example_inputs():
    config = tiny_models.MODELS["UNet2DConditionModel"][1]
    no_size = diffusers.UNet2DConditionModel(**{**config, "sample_size": None})
    with pytest.raises(ValueError, match=r"^pass example_inputs: .* UNet2DConditionModel config \(sample_size missing"):
        example_inputs_for(no_size)
    identity = diffusers.UNet2DConditionModel(**config, class_embed_type="identity")
    with pytest.raises(ValueError, match="pass example_inputs: .* \\(class_embed_type 'identity' takes inputs"):
        example_inputs_for(identity)
    with pytest.raises(ValueError, match=r"pass example_inputs: .* AutoencoderKL config \(no recipe"):
        example_inputs_for(tiny_models.build("AutoencoderKL"))
    with pytest.raises(ValueError, match=r"pass example_inputs: .* Linear \(it has no diffusers config\)"):
        example_inputs_for(torch.nn.Linear(4, 4))
