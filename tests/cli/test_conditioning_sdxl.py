"""SDXL through the CLI jobs: a tiny pipeline dir in StableDiffusionXLPipeline's layout (a text_time UNet, CLIPTextModel
and CLIPTextModelWithProjection with their tokenizers, a VAE, a DDPM schedule), its prompt embeddings, pooled text
embeds, negatives and sampled latents held against diffusers' own pipeline, the time ids at the job's resolution,
and text encoders that do not fit the UNet refused before --out."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from tests.cli.test_conditioning import _run, _samples, captioned, sd_pipeline  # noqa: F401 (fixtures)
from tests.cli.test_conditioning_mmdit import (  # noqa: F401 (its skips and marks: transformers, diffusers)
    CLIP_WIDTH,
    _clip,
    _clip_tokenizer,
    _jobs,
    diffusers,
    pytestmark,
    transformers,
)
from tests.tiny_models import tiny_sdxl_unet

SIZE = 8  # latents; the VAE doubles them, so images and time ids are 16 pixels


@pytest.fixture(scope="module")
def sdxl_pipeline(sd_pipeline, tmp_path_factory):  # noqa: F811
    """StableDiffusionXLPipeline's layout: unet/ (addition_embed_type text_time), vae/, text_encoder/ (CLIPTextModel)
    + tokenizer/, text_encoder_2/ (CLIPTextModelWithProjection) + tokenizer_2/, scheduler/, model_index.json."""
    root = tmp_path_factory.mktemp("sdxl") / "pipe"
    for part in ("vae", "scheduler"):
        shutil.copytree(sd_pipeline / part, root / part)
    tokenizer = _clip_tokenizer(tmp_path_factory.mktemp("vocab"))
    torch.manual_seed(0)
    for suffix, projection in (("", False), ("_2", True)):
        tokenizer.save_pretrained(root / f"tokenizer{suffix}")
        _clip(root, f"text_encoder{suffix}", tokenizer, projection=projection)
    tiny_sdxl_unet(text_width=2 * CLIP_WIDTH, pooled_width=CLIP_WIDTH).save_pretrained(root / "unet")
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _diffusers_pipeline(root, unet, scheduler, force_zeros: bool = True):
    """diffusers' StableDiffusionXLPipeline built from the dir's parts (loaded by transformers' own classes)."""
    parts = {}
    for suffix in ("", "_2"):
        parts[f"tokenizer{suffix}"] = transformers.CLIPTokenizer.from_pretrained(root / f"tokenizer{suffix}")
        cls = transformers.CLIPTextModelWithProjection if suffix else transformers.CLIPTextModel
        parts[f"text_encoder{suffix}"] = cls.from_pretrained(root / f"text_encoder{suffix}")
    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae")
    return diffusers.StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, add_watermarker=False,
                                               force_zeros_for_empty_prompt=force_zeros, **parts)  # fmt: skip


def _conditioning(root, prompts=None, **extra):
    from prunedm.cli.models import load_model
    from prunedm.cli.pipeline import load_conditioning

    config = {"model": str(root), "pipeline": None, "prompts": prompts, "class_labels": None, "guidance_scale": None,
              "num_samples": len(prompts or []), **extra}  # fmt: skip
    model = load_model(str(root)).eval()
    return config, model, load_conditioning(config, model, torch.device("cpu"))


def test_sdxl_finetune_learn_mask_and_sample(sdxl_pipeline, captioned, tmp_path):  # noqa: F811
    args = _jobs(sdxl_pipeline, captioned, tmp_path)  # finetune (cond_dropout 0.5), learn-mask (MaskLLM)
    assert _run("sample", *args, "prompts=[a red cat, a dog]", out=tmp_path / "s1") == 0  # SDXL's guidance 5
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=5", out=tmp_path / "s2") == 0
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=1", out=tmp_path / "s3") == 0
    first, five, unguided = (_samples(tmp_path / n) for n in ("s1", "s2", "s3"))
    assert first.shape == (2, 3, 2 * SIZE, 2 * SIZE) and torch.isfinite(first).all()  # decoded by the VAE
    assert torch.equal(first, five) and not torch.equal(first, unguided)


def test_prompt_encoding_matches_stable_diffusion_xl_pipeline(sdxl_pipeline):
    prompts = ["a red cat", ""]
    _, model, cond = _conditioning(sdxl_pipeline)
    got = cond.encode(prompts)
    assert cond.key == ("encoder_hidden_states", "text_embeds")
    for force_zeros in (True, False):
        pipe = _diffusers_pipeline(sdxl_pipeline, model, diffusers.DDPMScheduler(), force_zeros)
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
        assert torch.equal(got["encoder_hidden_states"], embeds)
        assert torch.equal(got["text_embeds"], pooled)
        null = cond.null()  # the empty prompt: condition dropout's fill, and the negative without force_zeros
        want = (
            (torch.zeros_like(embeds), torch.zeros_like(pooled))
            if force_zeros
            else (null[0].expand_as(embeds), null[1].expand_as(pooled))
        )
        assert torch.equal(negative, want[0]) and torch.equal(negative_pooled, want[1])
    # time ids of an uncropped image at the pipeline's default resolution (sample_size x the VAE's 2)
    time_ids = pipe._get_add_time_ids((2 * SIZE, 2 * SIZE), (0, 0), (2 * SIZE, 2 * SIZE), torch.float32,
                                      text_encoder_projection_dim=CLIP_WIDTH)  # fmt: skip
    assert torch.equal(cond.time_ids[None], time_ids)
    assert cond.time_ids.tolist() == [16, 16, 0, 0, 16, 16]


def test_training_data_carries_time_ids_and_dropout_drops_both_embeddings(sdxl_pipeline, captioned):  # noqa: F811
    from prunedm.cli.pipeline import conditioned_data, training_dropout
    from prunedm.diffusion import predict

    config, model, _ = _conditioning(sdxl_pipeline, data=str(captioned), cond_dropout=1.0)
    cond, data = conditioned_data(config, model, torch.device("cpu"))
    batch = data[torch.arange(4)]
    assert set(batch) == {"images", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert batch["images"].shape == (4, 4, SIZE, SIZE)  # latents of 16-pixel images
    assert torch.equal(batch["time_ids"], cond.time_ids.expand(4, 6))
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs["added_cond_kwargs"], encoder_hidden_states=kwargs["encoder_hidden_states"])

    null = cond.null()
    with training_dropout(model, cond, 1.0), torch.no_grad():  # every sample dropped to the empty prompt
        model.register_forward_pre_hook(record, with_kwargs=True)  # runs after the dropout's hook
        predict(model, batch["images"], torch.tensor([1, 2, 3, 4]), {k: v for k, v in batch.items() if k != "images"})
    assert torch.equal(seen["encoder_hidden_states"], null[0].expand(4, -1, -1))
    assert torch.equal(seen["text_embeds"], null[1].expand(4, -1))
    assert torch.equal(seen["time_ids"], batch["time_ids"])  # size/crop ids are never dropped


def test_sampling_matches_stable_diffusion_xl_pipeline(sdxl_pipeline):
    """The same noise through StableDiffusionXLPipeline (DDIM, CFG 5 against zero negatives, its time ids) and
    prunedm's sampler on the conditions prunedm builds."""
    from prunedm.cli.pipeline import sampling_conditions, scheduler_config
    from prunedm.eval.sampling import sample_images

    prompts = ["a red cat", "a dog"]
    config, model, cond = _conditioning(sdxl_pipeline, prompts)
    conditions, null, scale = sampling_conditions(config, cond)
    assert scale == 5.0 and torch.equal(null["text_embeds"], torch.zeros(1, CLIP_WIDTH))
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config(config))
    got = sample_images(model, copy.deepcopy(scheduler), 2, 3, seed=5, conditions=conditions, null=null,
                        guidance_scale=scale)  # fmt: skip
    pipe = _diffusers_pipeline(sdxl_pipeline, model, scheduler)
    with torch.no_grad():
        latents = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                       generator=torch.Generator().manual_seed(5)).images  # fmt: skip
    torch.testing.assert_close(got, latents.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_encoders_that_do_not_fit_the_unet_are_refused_before_out(sdxl_pipeline, captioned, tmp_path, capsys):  # noqa: F811
    narrow = tmp_path / "narrow"
    shutil.copytree(sdxl_pipeline, narrow)
    file = narrow / "text_encoder_2" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "projection_dim": 2 * CLIP_WIDTH}))
    no_second = tmp_path / "no-second"
    shutil.copytree(sdxl_pipeline, no_second)
    shutil.rmtree(no_second / "text_encoder_2")
    cases = [
        (("finetune", f"model={narrow}", f"data={captioned}", "finetune.steps=1"), "projection_dim 16 + 6 x"),
        (("sample", f"model={no_second}", "prompts=[a cat]"), "no text_encoder_2/; a UNet2DConditionModel needs"),
    ]
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert _run(*args, out=out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
        assert not out.exists(), args


def test_prune_gradient_pass_sees_each_images_pooled_embeds_and_time_ids(
    sdxl_pipeline,
    captioned,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    import prunedm.pruning.importance as importance

    seen = []
    real = importance.predict

    def spy(model, noisy, timesteps, batch):
        added = {**batch.get("added_cond_kwargs", {}), **{k: batch[k] for k in ("text_embeds", "time_ids")}}
        seen.append(added)  # what predict passes to the UNet: the batch's own over example_inputs' random ones
        return real(model, noisy, timesteps, batch)

    monkeypatch.setattr(importance, "predict", spy)
    assert _run("prune", f"model={sdxl_pipeline}", f"channels.data={captioned}", "channels.importance=taylor",
                "channels.max_timesteps=2", "channels.round_to=null", out=tmp_path / "p") == 0  # fmt: skip
    _, _, cond = _conditioning(sdxl_pipeline)
    captions = ["a red cat", "a blue dog", "a red cat", "a dog"]  # 0.txt .. 3.txt
    assert len(seen) == 1 and seen[0]["text_embeds"].shape[0] == 8  # 4 images x 2 timesteps in one pass
    torch.testing.assert_close(seen[0]["text_embeds"], cond.encode(captions)["text_embeds"].repeat(2, 1))
    assert torch.equal(seen[0]["time_ids"], cond.time_ids.expand(8, 6))
