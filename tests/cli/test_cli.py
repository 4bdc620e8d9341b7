"""The `prunedm` command line on tiny models: each job, overrides, resume rules, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
        (["sample", "model=arch:tiny-unet", "scheduler=euler"], "scheduler must be ddim or ddpm"),
        (["prune", "model=arch:tiny-unet", "method=width"], "method must be channels or depth"),
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
