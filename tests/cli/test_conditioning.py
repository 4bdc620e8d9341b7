"""Conditioned models through the CLI jobs: a tiny text-conditioned SD-style pipeline dir (UNet2DConditionModel +
CLIPTextModel + CLIPTokenizer built here, from configs and a tiny vocab) and a tiny class-conditioned DiT, trained
on captioned images or class folders; classifier-free guidance checked by hand; bad inputs refused before --out."""

from __future__ import annotations

import json
from copy import deepcopy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prunedm.cli import main

transformers = pytest.importorskip("transformers", reason="text conditioning needs transformers (requirements-dev)")
diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread_module")]

SIZE, WIDTH, TOKENS = 8, 16, 6
DIT_LABELS = {"0": "cat, kitty", "1": "dog", "2": "bird"}


def _tokenizer(where):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    (where / "vocab.json").write_text(json.dumps(vocab))
    (where / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(where / "vocab.json"), str(where / "merges.txt"), model_max_length=TOKENS)


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    """A pipeline dir as diffusers lays out StableDiffusionPipeline's: unet/ (on 4-channel latents), vae/,
    text_encoder/, tokenizer/, scheduler/."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    tokenizer = _tokenizer(tmp_path_factory.mktemp("vocab"))
    tokenizer.save_pretrained(root / "tokenizer")
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1))  # fmt: skip
    encoder.save_pretrained(root / "text_encoder")
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=8)  # fmt: skip
    unet.save_pretrained(root / "unet")
    diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                            sample_size=2 * SIZE).save_pretrained(root / "vae")  # fmt: skip
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012).save_pretrained(root / "scheduler")  # fmt: skip
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6, num_layers=2, sample_size=SIZE,
        patch_size=2, num_embeds_ada_norm=len(DIT_LABELS), norm_num_groups=8)  # fmt: skip
    dit.save_pretrained(root / "transformer")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "id2label": DIT_LABELS}))
    return root


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioned")
    for i, caption in enumerate(["a red cat", "a blue dog", "a red cat", "a dog"]):
        _image(folder / f"{i}.png", i)
        (folder / f"{i}.txt").write_text(caption + "\n")
    return folder


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classes")
    for i, name in enumerate(["kitty", "dog", "2", "kitty"]):
        _image(folder / name / f"{i}.png", i)
    return folder


def _run(command, *args, out):
    return main([command, *map(str, args), "device=cpu", "--out", str(out)])


def _samples(out):
    return load_file(str(out / "samples.safetensors"))["images"]


def test_text_conditioned_finetune_learn_mask_and_sample(sd_pipeline, captioned, tmp_path):
    ft = tmp_path / "ft"
    assert _run("finetune", f"model={sd_pipeline}", f"data={captioned}", "cond_dropout=0.5", "finetune.steps=2",
                "finetune.batch_size=2", "finetune.progress=false", out=ft) == 0  # fmt: skip
    assert np.isfinite(json.loads((ft / "report.json").read_text())["final_loss"])
    lm = tmp_path / "lm"
    assert _run("learn-mask", f"model={sd_pipeline}", f"data={captioned}", "steps=2", "batch_size=2",
                "maskllm.preset=short", "cond_dropout=0.5", out=lm) == 0  # fmt: skip
    assert len(load_file(str(lm / "masks.safetensors"))) > 0
    # The finetuned UNet (a prunedm save) samples with the pipeline's text encoder through pipeline=.
    args = [f"model={ft / 'model'}", f"pipeline={sd_pipeline}", "num_samples=2", "steps=2"]
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=3", out=tmp_path / "s1") == 0
    assert _run("sample", *args, "prompts=[a red cat, a dog]", "guidance_scale=1", out=tmp_path / "s2") == 0
    assert _run("sample", *args, "prompts=[a dog, a red cat]", "guidance_scale=3", out=tmp_path / "s3") == 0
    first, unguided, swapped = (_samples(tmp_path / name) for name in ("s1", "s2", "s3"))
    assert first.shape == (2, 3, 2 * SIZE, 2 * SIZE) and torch.isfinite(first).all()  # decoded by the VAE
    assert not torch.equal(first, unguided)  # guidance changes the images
    assert not torch.equal(first, swapped)  # and so does the prompt


def test_class_conditioned_dit_finetune_learn_mask_and_sample(dit_pipeline, class_folders, tmp_path):
    ft = tmp_path / "ft"
    assert _run("finetune", f"model={dit_pipeline}", f"data={class_folders}", "finetune.steps=2",
                "finetune.batch_size=2", "finetune.progress=false", out=ft) == 0  # fmt: skip
    lm = tmp_path / "lm"
    assert _run("learn-mask", f"model={dit_pipeline}", f"data={class_folders}", "steps=2", "batch_size=2",
                "method=maskpro", "maskpro.preset=short", out=lm) == 0  # fmt: skip
    args = [f"model={ft / 'model'}", f"pipeline={dit_pipeline}", "num_samples=3", "steps=2"]
    assert _run("sample", *args, "class_labels=[kitty, 1, bird]", out=tmp_path / "s1") == 0  # guidance 4 (DiT's)
    assert _run("sample", *args, "class_labels=[0, dog, 2]", "guidance_scale=4", out=tmp_path / "s2") == 0
    assert torch.equal(_samples(tmp_path / "s1"), _samples(tmp_path / "s2"))  # names and ids, the default scale
    assert _run("eval", *args, "class_labels=[1]", "samples=null", out=tmp_path / "ev") == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_samples"] == 3


def test_guided_sampling_matches_a_hand_computation(dit_pipeline):
    from prunedm.cli.models import load_model
    from prunedm.eval.sampling import sample_images

    model = load_model(str(dit_pipeline)).eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    labels, scale = torch.tensor([2, 0]), 2.5
    got = sample_images(model, scheduler, 2, 2, seed=7, conditions={"class_labels": labels},
                        null={"class_labels": torch.tensor(3)}, guidance_scale=scale)  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    scheduler.set_timesteps(2)
    with torch.no_grad():
        for t in scheduler.timesteps:  # two separate forwards, the guidance formula written out
            cond = model(x, t.expand(2), class_labels=labels).sample[:, :3]
            uncond = model(x, t.expand(2), class_labels=torch.tensor([3, 3])).sample[:, :3]
            x = scheduler.step(uncond + scale * (cond - uncond), t, x, generator=gen).prev_sample
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_condition_dropout_swaps_samples_for_the_null_condition():
    from prunedm.conditioning import condition_dropout

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            seen.append(encoder_hidden_states)
            return x

    model = Recorder()
    states, null = torch.ones(64, 2, 3), torch.zeros(1, 2, 3)
    torch.manual_seed(0)
    with condition_dropout(model, "encoder_hidden_states", null, 0.25):
        model(torch.zeros(64), 0, encoder_hidden_states=states)
        copy = deepcopy(model)  # as finetune's EMA copies the model
    torch.manual_seed(0)
    dropped = torch.rand(64) < 0.25
    assert torch.equal(seen[0][dropped], torch.zeros(int(dropped.sum()), 2, 3))
    assert torch.equal(seen[0][~dropped], torch.ones(int((~dropped).sum()), 2, 3))
    model(torch.zeros(64), 0, encoder_hidden_states=states)  # the hook is gone after the block
    copy(torch.zeros(64), 0, encoder_hidden_states=states)  # and inert in copies
    assert torch.equal(seen[1], states) and torch.equal(seen[2], states)


@pytest.fixture(scope="module")
def class_unet(tmp_path_factory):
    """A class-conditioned UNet2DModel: its class embedding has no null row, so no guidance."""
    root = tmp_path_factory.mktemp("class-unet")
    diffusers.UNet2DModel(sample_size=SIZE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          num_class_embeds=3).save_pretrained(root)  # fmt: skip
    return root


def test_bad_inputs_give_one_clear_error_before_out_is_written(sd_pipeline, dit_pipeline, class_unet, class_folders,
                                                               captioned, tmp_path, capsys):  # fmt: skip
    uncaptioned = tmp_path / "uncaptioned"
    _image(uncaptioned / "0.png", 0)
    cases = [
        (("finetune", f"model={sd_pipeline}", f"data={uncaptioned}"), "0.png has no caption 0.txt"),
        (("finetune", f"model={dit_pipeline}", f"data={captioned}"), "is not in a class folder"),
        (("learn-mask", f"model={dit_pipeline}", f"data={class_folders.parent / 'nowhere'}"), "must be a folder"),
        (("sample", "model=arch:tiny-unet", "prompts=[a cat]"), "prompts=['a cat']: the UNet2DModel is unconditional"),
        (("sample", "model=arch:tiny-unet", "guidance_scale=3"), "unconditional, nothing to guide"),
        (("sample", f"model={sd_pipeline}"), "is text-conditioned: set prompts="),
        (("sample", f"model={sd_pipeline}", "class_labels=[1]"), "drop class_labels"),
        (("sample", f"model={sd_pipeline / 'unet'}", "prompts=[a]"), "at the pipeline dir holding its text_encoder/"),
        (("sample", f"model={dit_pipeline}", "class_labels=[horse]"), "'horse' is not a class"),
        (("sample", f"model={class_unet}", "class_labels=[1]", "guidance_scale=2"), "has no null class"),
        (("finetune", f"model={class_unet}", f"data={class_folders}", "cond_dropout=0.1"), "no null condition"),
    ]
    mismatched = tmp_path / "mismatched"
    _image(mismatched / "horse" / "0.png", 0)
    cases.append((("finetune", f"model={dit_pipeline}", f"data={mismatched}"), "class folder 'horse'"))
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        extra = ["finetune.steps=1"] if args[0] == "finetune" else []
        assert _run(*args, *extra, out=out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
        assert not out.exists(), args


def test_prune_gradient_pass_sees_each_images_caption(sd_pipeline, captioned, tmp_path, monkeypatch):
    import prunedm.pruning.channels as channels

    seen = {}
    real = channels.accumulate_denoising_gradients

    def spy(model, images, **kwargs):
        seen.update(images=images, **kwargs["model_kwargs"])
        return real(model, images, **kwargs)

    monkeypatch.setattr(channels, "accumulate_denoising_gradients", spy)
    assert _run("prune", f"model={sd_pipeline}", f"channels.data={captioned}", "channels.importance=taylor",
                "channels.max_timesteps=2", "channels.round_to=null", out=tmp_path / "p") == 0  # fmt: skip
    tokenizer = transformers.CLIPTokenizer.from_pretrained(sd_pipeline / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(sd_pipeline / "text_encoder")
    captions = ["a red cat", "a blue dog", "a red cat", "a dog"]  # 0.txt .. 3.txt
    ids = tokenizer(captions, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(seen["encoder_hidden_states"], encoder(ids)[0])
    assert seen["images"].shape == (4, 4, SIZE, SIZE)  # the VAE's latents


class _Stop(KeyboardInterrupt):
    """Stands for a kill (not caught as a user error)."""


def test_condition_dropout_resumes_bit_exactly(sd_pipeline, captioned, tmp_path, monkeypatch):
    from prunedm.masks import MaskLLMLearner

    common = [f"model={sd_pipeline}", f"data={captioned}", "cond_dropout=0.5"]
    finetune = [*common, "finetune.steps=3", "finetune.batch_size=2", "finetune.checkpoint_every=1",
                "finetune.log_every=1", "finetune.progress=false"]  # fmt: skip
    learn = [*common, "steps=3", "batch_size=2", "checkpoint_every=1", "maskllm.preset=short"]
    for job, args in (("finetune", finetune), ("learn-mask", learn)):
        assert _run(job, *args, out=tmp_path / f"{job}-straight") == 0
    original = MaskLLMLearner.step

    def dying_step(self, batch):
        if self.step_count == 2:
            raise _Stop
        return original(self, batch)

    monkeypatch.setattr(MaskLLMLearner, "step", dying_step)
    assert _run("learn-mask", *learn, out=tmp_path / "learn-mask") == 130
    monkeypatch.setattr(MaskLLMLearner, "step", original)
    from prunedm.train import checkpoint

    save = checkpoint.save_checkpoint

    def dying_save(root, step, tensors, state, keep=2):
        if step > 1:
            raise _Stop
        return save(root, step, tensors, state, keep)

    monkeypatch.setattr(checkpoint, "save_checkpoint", dying_save)
    assert _run("finetune", *finetune, out=tmp_path / "finetune") == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    for job, args in (("finetune", finetune), ("learn-mask", learn)):
        assert main([job, *args, "device=cpu", "--out", str(tmp_path / job), "--resume"]) == 0
        straight, resumed = tmp_path / f"{job}-straight", tmp_path / job
        files = sorted(p.relative_to(straight) for p in straight.rglob("*.safetensors") if "checkpoints" not in p.parts)
        assert files and files == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors")
                                         if "checkpoints" not in p.parts)  # fmt: skip
        for file in files:
            expected, got = load_file(str(straight / file)), load_file(str(resumed / file))
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), file
        losses = [[(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
                  for out in (straight, resumed)]  # fmt: skip
        assert losses[0] == losses[1] and len(losses[0]) == 3, job
