"""The `prunedm` command line on tiny models: each job, overrides, resume rules, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from prunedm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_console_script_info():
    out = subprocess.run([sys.executable, "-m", "prunedm", "info"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert {"cpu", "cuda", "triton", "torch", "prunedm"} <= set(info)


def test_prune_sparsify_sample_pipeline(tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "model=arch:tiny-unet", "channels.ratio=0.25", "--out", str(pruned)]) == 0
    report = json.loads((pruned / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert (pruned / "config.yaml").exists() and (pruned / "model" / "structure.json").exists()

    sparse = tmp_path / "sparse"
    assert main(["sparsify", f"model={pruned / 'model'}", "backend=dense", "--out", str(sparse)]) == 0
    report = json.loads((sparse / "report.json").read_text())
    assert report["converted"] and report["bytes_after"] < report["bytes_before"]

    samples = tmp_path / "samples"
    assert main(["sample", f"model={sparse / 'model'}", "num_samples=4", "steps=2", "--out", str(samples)]) == 0
    assert (samples / "samples.png").stat().st_size > 0


def test_finetune_and_resume_rules(tmp_path, capsys):
    out = tmp_path / "ft"
    args = [
        "finetune",
        "model=arch:tiny-unet",
        "finetune.steps=2",
        "finetune.batch_size=4",
        "finetune.log_every=1",
        "finetune.progress=false",
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main([*args, "--out", str(out)]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert main([*args[:-1], "finetune.steps=3", "--out", str(out), "--resume"]) == 2
    assert "config differs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "channels.ratoi=0.5"], "unknown config key 'channels.ratoi'; did you mean 'ratio'?"),
        (["prune"], "no model given"),
        (["prune", "model=arch:nope"], "unknown architecture"),
        (["prune", "model=some-org/some-model"], "no local copy"),
        (["prune", "--config", "/nonexistent.yaml"], "no such file"),
        (["sample", "model=arch:tiny-unet", "scheduler=euler"], "scheduler must be one of ddim, ddpm, got 'euler'"),
        (["prune", "model=arch:tiny-unet", "method=width"], "method must be one of channels, depth, got 'width'"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["maskllm", "maskpro", "magnitude"])
def test_learn_mask_writes_2to4_masks_and_resumes(tmp_path, capsys, method):
    from safetensors.torch import load_file

    from prunedm import load_pretrained, ops

    out = tmp_path / method
    args = ["learn-mask", "model=arch:tiny-unet", f"method={method}", "steps=2", "batch_size=4", "checkpoint_every=1"]
    assert main([*args, "--out", str(out)]) == 0
    masks = load_file(str(out / "masks.safetensors"))
    assert len(masks) >= 10
    model = load_pretrained(out / "model")
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1) if weight.dim() == 4 else weight
        assert ops.nm_violations(matrix, 2, 4) == 0, name
    if method != "magnitude":
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
        assert main([*args, "--out", str(out), "--resume"]) == 0  # already at step 2: nothing to redo
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _write_images(path, images):
    from safetensors.torch import save_file

    save_file({"images": images.contiguous()}, str(path))
    return path


def test_eval_tells_digits_from_noise(tmp_path, capsys):
    from prunedm.data import DigitsDataset

    digits = _write_images(tmp_path / "digits.safetensors", DigitsDataset("test", size=16).images[:128])
    noise = _write_images(
        tmp_path / "noise.safetensors", torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    results = {}
    for name, path in [("digits", digits), ("noise", noise)]:
        out = tmp_path / f"eval-{name}"
        assert main(["eval", f"samples={path}", "--out", str(out)]) == 0
        results[name] = json.loads((out / "metrics.json").read_text())
        assert (out / "samples.png").stat().st_size > 0
    assert results["digits"]["num_samples"] == 128 and results["digits"]["features"] == "digits-classifier"
    assert results["digits"]["fid"] < 0.2 * results["noise"]["fid"]
    assert results["digits"]["classifier_accuracy"] > 0.8 > results["noise"]["classifier_accuracy"]
    assert results["digits"]["class_entropy"] > 2.0  # all ten digits present in the test split


def test_eval_samples_a_model_and_flags_set_config(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "model=arch:tiny-unet", "num_samples=8", "steps=1", "--seed", "3", "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["seed"] == 3 and config["device"] == "cpu" and config["dtype"] == "float32"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and metrics["fid"] > 0 and metrics["model"] == "arch:tiny-unet"
    from safetensors.torch import load_file

    images = load_file(str(out / "samples.safetensors"))["images"]
    assert images.shape == (8, 1, 16, 16) and float(images.abs().max()) <= 1.0
    # --seed on finetune is finetune.seed
    ft = tmp_path / "ft"
    args = ["finetune", "model=arch:tiny-unet", "finetune.steps=1", "finetune.batch_size=4", "finetune.progress=false"]
    assert main([*args, "--seed", "5", "--out", str(ft)]) == 0
    assert yaml.safe_load((ft / "config.yaml").read_text())["finetune"]["seed"] == 5


def test_sparsify_with_learned_masks(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    masks = tmp_path / "masks"
    assert main(["learn-mask", "model=arch:tiny-unet", "method=magnitude", "--out", str(masks)]) == 0
    sparse = tmp_path / "sparse"
    argv = ["sparsify", f"model={masks / 'model'}", f"masks={masks / 'masks.safetensors'}", "backend=dense"]
    assert main([*argv, "--out", str(sparse)]) == 0
    report = json.loads((sparse / "report.json").read_text())
    assert set(report["converted"]) <= set(load_file(str(masks / "masks.safetensors")))
    assert len(report["converted"]) >= 10
    # a mask that keeps 3 of 4 breaks the 2:4 rule: one line, nothing written
    broken = {name: torch.ones_like(mask) for name, mask in load_file(str(masks / "masks.safetensors")).items()}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    capsys.readouterr()
    argv = ["sparsify", f"model={masks / 'model'}", f"masks={tmp_path / 'broken.safetensors'}"]
    assert main([*argv, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "2:4" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "model=arch:tiny-unet", "method=depth"], "method=depth needs a transformer"),
        (["learn-mask", "model=arch:tiny-unet", "pattern=4:2"], "N:M pattern with 0 < N < M, e.g. 2:4, got '4:2'"),
        (["learn-mask", "model=arch:tiny-unet", "pattern=two"], "N:M pattern with 0 < N < M, e.g. 2:4, got 'two'"),
        (["sparsify", "model=arch:tiny-unet", "masks=/nonexistent/masks.safetensors"], "no such file"),
        (["eval", "model=arch:tiny-unet", "samples=/tmp/x.safetensors"], "exactly one of model="),
        (["eval", "samples=/nonexistent.safetensors"], "expected a samples.safetensors"),
        (["eval", "model=arch:tiny-unet", "features=clip"], "features must be one of digits-classifier, inception"),
        (["eval", "model=arch:tiny-unet", "features=inception"], "needs inception_dir"),
        (["eval", "model=arch:tiny-unet", "reference=/nonexistent"], "expected 'digits' or a folder"),
        (["sample", "model=arch:tiny-unet", "num_samples=0"], "num_samples must be an integer in [1, 100000], got 0"),
        (["sample", "model=asset:nope"], "no such shipped model"),
        (["sample", "model=arch:tiny-unet", "device=tpu"], "device must be one of"),
        (["sparsify", "model=arch:tiny-unet", "dtype=int8"], "dtype must be one of"),
        (["demo", "prune.ratoi=0.5"], "unknown config key 'prune.ratoi'; did you mean 'ratio'?"),
    ],
)
def test_more_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_non_empty_out_without_resume(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["sample", "model=arch:tiny-unet", "--out", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_bench_delegates_to_bench_run(monkeypatch, tmp_path):
    import types

    calls = []
    fake = types.ModuleType("prunedm.bench.run")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "prunedm.bench.run", fake)
    assert main(["bench", "--out", str(tmp_path), "--device", "cpu", "--quick", "--suite", "ops,layers"]) == 0
    assert calls == [["--out", str(tmp_path), "--device", "cpu", "--quick", "--suite", "ops,layers"]]


def test_real_scale_path_local_diffusers_dir_and_image_folders(tmp_path, capsys):
    """What a user with a downloaded google/ddpm-cifar10-32 and CIFAR-10 as PNGs runs: a diffusers model
    dir (here a tiny random-init RGB UNet saved with save_pretrained) and image folders."""
    import numpy as np
    from diffusers import UNet2DModel
    from PIL import Image

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "ddpm")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # 20x20 RGB: resized to the model's 16x16
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    ft = tmp_path / "ft"
    argv = ["finetune", f"model={tmp_path / 'ddpm'}", f"data={images}", "finetune.steps=2", "finetune.batch_size=4"]
    assert main([*argv, "finetune.progress=false", "--out", str(ft)]) == 0
    assert [json.loads(x)["step"] for x in (ft / "metrics.jsonl").read_text().splitlines()][-1] == 2
    ev = tmp_path / "eval"
    argv = ["eval", f"model={ft / 'model'}", f"reference={images}", "num_samples=8", "steps=1", "--device", "cpu"]
    assert main([*argv, "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and metrics["fid"] > 0 and metrics["reference"] == str(images)
    # a folder without images is one clear error
    (tmp_path / "empty").mkdir()
    argv = ["finetune", f"model={tmp_path / 'ddpm'}", f"data={tmp_path / 'empty'}", "--out", str(tmp_path / "ft2")]
    assert main(argv) == 2
    assert "holds no images" in capsys.readouterr().err
