"""SD3 and Flux (flow matching, CLIP + T5 prompts) through the CLI jobs: tiny pipeline dirs built here (1-layer
transformers, CLIP and T5 encoders from configs, tokenizers from a vocab written here, no VAE: the transformers
denoise RGB directly), their prompt embeddings held against diffusers' own pipelines, the flow-matching rules
against a hand computation, Flux's latent packing against FluxPipeline's, bad inputs refused before --out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.cli.test_conditioning import _run, _samples

transformers = pytest.importorskip("transformers", reason="text conditioning needs transformers (requirements-dev)")
diffusers = pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("one_thread_module"),
]

SIZE, TOKENS, CLIP_WIDTH, JOINT = 8, 6, 8, 16
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _clip_tokenizer(where):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in LETTERS:
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    (where / "vocab.json").write_text(json.dumps(vocab))
    (where / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(where / "vocab.json"), str(where / "merges.txt"), model_max_length=TOKENS)


def _clip(root, name, tokenizer, projection: bool):
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=CLIP_WIDTH, bos_token_id=0,
        eos_token_id=1, pad_token_id=1)  # fmt: skip
    cls(config).save_pretrained(root / name)


def _t5(root, encoder_name, tokenizer_name):
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in LETTERS]
    tokenizer = transformers.T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(root / tokenizer_name)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=JOINT, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8)  # fmt: skip
    transformers.T5EncoderModel(config).save_pretrained(root / encoder_name)


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    """StableDiffusion3Pipeline's layout: transformer/, text_encoder(_2, _3)/, tokenizer(_2, _3)/, scheduler/."""
    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(tmp_path_factory.mktemp("vocab"))
    for suffix in ("", "_2"):
        tokenizer.save_pretrained(root / f"tokenizer{suffix}")
        _clip(root, f"text_encoder{suffix}", tokenizer, projection=True)
    _t5(root, "text_encoder_3", "tokenizer_3")
    diffusers.SD3Transformer2DModel(
        sample_size=SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=8).save_pretrained(root / "transformer")  # fmt: skip
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return root


@pytest.fixture(scope="module")
def flux_pipeline(tmp_path_factory):
    """FluxPipeline's layout: transformer/ (guidance-distilled; 12 input channels = 3 packed 2x2),
    text_encoder/ (CLIP) + tokenizer/, text_encoder_2/ (T5) + tokenizer_2/, scheduler/ (dynamic shifting)."""
    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(tmp_path_factory.mktemp("vocab"))
    tokenizer.save_pretrained(root / "tokenizer")
    _clip(root, "text_encoder", tokenizer, projection=False)
    _t5(root, "text_encoder_2", "tokenizer_2")
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=JOINT, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4))  # fmt: skip
    model.register_to_config(sample_size=SIZE)  # latent size (FluxPipeline's default 128 is far too big here)
    model.save_pretrained(root / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(
        root / "scheduler")  # fmt: skip
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioned")
    for i, caption in enumerate(["a red cat", "a blue dog", "a red cat", "a dog"]):
        pixels = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n")
    return folder


def _jobs(pipeline, captioned, tmp_path):
    ft = tmp_path / "ft"
    assert _run("finetune", f"model={pipeline}", f"data={captioned}", "cond_dropout=0.5", "finetune.steps=2",
                "finetune.batch_size=2", "finetune.progress=false", out=ft) == 0  # fmt: skip
    assert np.isfinite(json.loads((ft / "report.json").read_text())["final_loss"])
    lm = tmp_path / "lm"
    assert _run("learn-mask", f"model={pipeline}", f"data={captioned}", "steps=2", "batch_size=2",
                "maskllm.preset=short", out=lm) == 0  # fmt: skip
    assert len(load_file(str(lm / "masks.safetensors"))) > 0
    return [f"model={ft / 'model'}", f"pipeline={pipeline}", "num_samples=2", "steps=2"]


def test_sd3_finetune_learn_mask_and_guided_sample(sd3_pipeline, captioned, tmp_path):
    args = _jobs(sd3_pipeline, captioned, tmp_path)
    assert _run("sample", *args, "prompts=[a red cat, a dog]", out=tmp_path / "s1") == 0  # SD3's guidance 7
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=7", out=tmp_path / "s2") == 0
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=1", out=tmp_path / "s3") == 0
    first, seven, unguided = (_samples(tmp_path / n) for n in ("s1", "s2", "s3"))
    assert first.shape == (2, 3, SIZE, SIZE) and torch.isfinite(first).all()
    assert torch.equal(first, seven) and not torch.equal(first, unguided)


def test_flux_finetune_learn_mask_and_sample_with_guidance_embedding(flux_pipeline, captioned, tmp_path):
    args = _jobs(flux_pipeline, captioned, tmp_path)
    assert _run("sample", *args, "prompts=[a red cat, a dog]", out=tmp_path / "s1") == 0  # guidance 3.5
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=3.5", out=tmp_path / "s2") == 0
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=8", out=tmp_path / "s3") == 0
    first, same, other = (_samples(tmp_path / n) for n in ("s1", "s2", "s3"))
    assert first.shape == (2, 3, SIZE, SIZE) and torch.isfinite(first).all()
    assert torch.equal(first, same) and not torch.equal(first, other)  # the value reaches the guidance embedder


def _both(sd3_pipeline, flux_pipeline, prompts):
    """For each pipeline dir: (its config for the CLI's conditioning, the transformer, prunedm's Conditioning,
    diffusers' own pipeline class built from the same parts, loaded by transformers from the classes they name)."""
    from prunedm.cli.models import load_model
    from prunedm.cli.pipeline import flow_scheduler, load_conditioning

    pipelines = ((sd3_pipeline, diffusers.StableDiffusion3Pipeline, 3), (flux_pipeline, diffusers.FluxPipeline, 2))
    for root, cls, count in pipelines:
        config = {"model": str(root), "pipeline": None, "prompts": prompts, "class_labels": None,
                  "guidance_scale": None, "num_samples": len(prompts)}  # fmt: skip
        model = load_model(str(root)).eval()
        parts = {}
        for suffix in ("", "_2", "_3")[:count]:
            parts[f"tokenizer{suffix}"] = transformers.AutoTokenizer.from_pretrained(root / f"tokenizer{suffix}")
            encoder = root / f"text_encoder{suffix}"
            architecture = json.loads((encoder / "config.json").read_text())["architectures"][0]
            parts[encoder.name] = getattr(transformers, architecture).from_pretrained(encoder)
        pipe = cls(transformer=model, scheduler=flow_scheduler(config), vae=None, **parts)
        yield config, model, load_conditioning(config, model, torch.device("cpu")), pipe


def test_prompt_embeddings_match_the_diffusers_pipelines(sd3_pipeline, flux_pipeline):
    prompts = ["a red cat", ""]
    for _, _, cond, pipe in _both(sd3_pipeline, flux_pipeline, prompts):
        got = cond.encode(prompts)
        with torch.no_grad():
            if isinstance(pipe, diffusers.FluxPipeline):
                embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu")
            else:
                embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                          do_classifier_free_guidance=False)  # fmt: skip
        torch.testing.assert_close(got["encoder_hidden_states"], embeds)
        torch.testing.assert_close(got["pooled_projections"], pooled)


def test_sampling_matches_the_diffusers_pipelines(sd3_pipeline, flux_pipeline):
    """The same noise through StableDiffusion3Pipeline (CFG 7) and FluxPipeline (guidance 3.5, dynamic shift),
    their latents against prunedm's sampler on the conditions prunedm encodes."""
    from prunedm.cli.pipeline import flow_scheduler, sampling_conditions
    from prunedm.eval.sampling import sample_images

    prompts = ["a red cat", "a dog"]
    for config, model, cond, pipe in _both(sd3_pipeline, flux_pipeline, prompts):
        conditions, null, scale = sampling_conditions(config, cond)
        got = sample_images(model, flow_scheduler(config), 2, 3, seed=5, conditions=conditions, null=null,
                            guidance_scale=scale)  # fmt: skip
        with torch.no_grad():
            latents = pipe(prompts, num_inference_steps=3, height=8 * SIZE, width=8 * SIZE, output_type="latent",
                           generator=torch.Generator().manual_seed(5)).images  # fmt: skip
        if isinstance(pipe, diffusers.FluxPipeline):
            latents = pipe._unpack_latents(latents, 8 * SIZE, 8 * SIZE, 8)
        torch.testing.assert_close(got, latents.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_sd3_without_t5_uses_zeros_as_diffusers(sd3_pipeline, tmp_path):
    from prunedm.cli.models import load_model
    from prunedm.cli.pipeline import load_conditioning

    root = tmp_path / "no-t5"
    shutil.copytree(sd3_pipeline, root)
    shutil.rmtree(root / "text_encoder_3")
    shutil.rmtree(root / "tokenizer_3")
    model = load_model(str(root))
    with_t5 = load_conditioning({"model": str(sd3_pipeline), "pipeline": None}, model, torch.device("cpu"))
    without = load_conditioning({"model": str(root), "pipeline": None}, model, torch.device("cpu"))
    full, zeros = with_t5.encode(["a cat"]), without.encode(["a cat"])
    assert zeros["encoder_hidden_states"].shape == full["encoder_hidden_states"].shape == (1, TOKENS + 256, JOINT)
    assert torch.equal(zeros["encoder_hidden_states"][:, TOKENS:], torch.zeros(1, 256, JOINT))
    torch.testing.assert_close(zeros["encoder_hidden_states"][:, :TOKENS], full["encoder_hidden_states"][:, :TOKENS])
    torch.testing.assert_close(zeros["pooled_projections"], full["pooled_projections"])


def test_flow_matching_noising_target_and_timesteps_by_hand():
    from prunedm.diffusion import add_noise, diffusion_target, sample_timesteps

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    images, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    timesteps = torch.tensor([1000.0, 500.0, 250.0])
    sigma = torch.tensor([1.0, 0.5, 0.25]).view(3, 1, 1, 1)
    torch.testing.assert_close(add_noise(scheduler, images, noise, timesteps), (1 - sigma) * images + sigma * noise)
    assert torch.equal(diffusion_target(scheduler, images, noise, timesteps), noise - images)
    # logit-normal (SD3's default density): u = sigmoid(N(0, 1)), timestep = scheduler.timesteps[int(u * 1000)]
    got = sample_timesteps(scheduler, 5, "cpu", torch.Generator().manual_seed(3))
    u = torch.sigmoid(torch.normal(0.0, 1.0, (5,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(got, scheduler.timesteps[(u * 1000).long()])
    scheduler.timestep_density = "uniform"  # Flux's default ("none" in train_dreambooth_flux)
    got = sample_timesteps(scheduler, 5, "cpu", torch.Generator().manual_seed(3))
    u = torch.rand(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, scheduler.timesteps[(u * 1000).long()])


def test_flux_packing_round_trip_matches_flux_pipeline():
    from prunedm.diffusion import latent_image_ids, pack_latents, unpack_latents

    latents = torch.randn(2, 3, 6, 4)
    packed = pack_latents(latents)
    assert torch.equal(packed, diffusers.FluxPipeline._pack_latents(latents, 2, 3, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), latents)
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(3, 2), ids)


def test_bad_inputs_give_one_clear_error_before_out_is_written(sd3_pipeline, flux_pipeline, captioned, tmp_path,
                                                               capsys):  # fmt: skip
    no_tokenizer_2 = tmp_path / "no-tok2"
    shutil.copytree(sd3_pipeline, no_tokenizer_2)
    shutil.rmtree(no_tokenizer_2 / "tokenizer_2")
    no_t5 = tmp_path / "no-t5"
    shutil.copytree(flux_pipeline, no_t5)
    shutil.rmtree(no_t5 / "text_encoder_2")
    half_t5 = tmp_path / "half-t5"
    shutil.copytree(sd3_pipeline, half_t5)
    shutil.rmtree(half_t5 / "tokenizer_3")
    wide_t5 = tmp_path / "wide-t5"
    shutil.copytree(sd3_pipeline, wide_t5)
    config = json.loads((wide_t5 / "text_encoder_3" / "config.json").read_text())
    (wide_t5 / "text_encoder_3" / "config.json").write_text(json.dumps({**config, "d_model": 2 * JOINT}))
    cases = [
        (("sample", f"model={wide_t5}", "prompts=[a cat]"), "T5 d_model 32 != joint_attention_dim 16"),
        (("finetune", f"model={no_tokenizer_2}", f"data={captioned}"), "no tokenizer_2/; a SD3Transformer2DModel"),
        (("sample", f"model={no_t5}", "prompts=[a cat]"), "no text_encoder_2/; a FluxTransformer2DModel needs"),
        (("learn-mask", f"model={half_t5}", f"data={captioned}"), "no tokenizer_3/"),
        (("sample", f"model={sd3_pipeline}"), "is text-conditioned: set prompts="),
    ]
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        extra = ["finetune.steps=1"] if args[0] == "finetune" else []
        assert _run(*args, *extra, out=out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
        assert not out.exists(), args
