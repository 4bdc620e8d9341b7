"""Save/load of pruned models without pickle: exact outputs in a fresh process, clear errors for corrupt or
mismatched files, atomic writes, and structure hooks for modules that rebuild themselves."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file, save_file
from tiny_models import tiny_conditional_unet, tiny_pruning_unet
from torch import nn

import prunedm
from prunedm import serialization
from prunedm.pruning import prune_channels, prune_depth
from prunedm.serialization import STRUCTURE_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained


def pruned_unet() -> tuple[UNet2DModel, dict]:
    """A fresh copy of one channel-pruned UNet (pruned once per session) and inputs for it."""
    model, inputs = _pruned_unet()
    return copy.deepcopy(model), dict(inputs)


@functools.cache
def _pruned_unet() -> tuple[UNet2DModel, dict]:
    model = tiny_pruning_unet()
    prune_channels(model, "magnitude", 0.3, round_to=None)  # the widths below are the unrounded ones
    return model, {"sample": torch.randn(2, 3, 8, 8), "timestep": torch.tensor([3, 700])}


def pruned_conditional_unet() -> tuple[UNet2DConditionModel, dict]:
    model = tiny_conditional_unet()
    prune_channels(model, "l1", 0.5, round_to=None)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([1, 999]),
        "encoder_hidden_states": torch.randn(2, 3, 16),
    }
    return model, inputs


def pruned_dit() -> tuple[DiTTransformer2DModel, dict]:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()
    with torch.no_grad():  # make the non-persistent position buffer differ from what the config rebuilds
        model.pos_embed.pos_embed.mul_(1.5)
    prune_depth(model, [1, 2])
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([5, 50]),
        "class_labels": torch.tensor([1, 7]),
    }
    return model, inputs


BUILDERS = {"unet": pruned_unet, "conditional_unet": pruned_conditional_unet, "dit": pruned_dit}

LOADER = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from prunedm.serialization import load_pretrained

    root = sys.argv[1]
    outputs = {}
    for name in sys.argv[2:]:
        model = load_pretrained(f"{root}/{name}")
        inputs = load_file(f"{root}/{name}.inputs.safetensors")
        with torch.no_grad():
            outputs[name] = model(**inputs).sample
    save_file(outputs, f"{root}/outputs.safetensors")
    """
)


def test_fresh_process_reproduces_pruned_models_exactly(tmp_path):
    expected = {}
    for name, build in BUILDERS.items():
        model, inputs = build()
        with torch.no_grad():
            expected[name] = model(**inputs).sample
        save_pretrained(model, tmp_path / name)
        save_file(inputs, tmp_path / f"{name}.inputs.safetensors")

    repo_root = str(Path(prunedm.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", LOADER, str(tmp_path), *BUILDERS], check=True, env=env, timeout=300)

    outputs = load_file(tmp_path / "outputs.safetensors")
    for name in BUILDERS:
        assert torch.equal(outputs[name], expected[name]), name


def test_loaded_model_has_the_pruned_structure_and_config(tmp_path):
    model, inputs = pruned_unet()
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert type(loaded) is UNet2DModel and not loaded.training
    assert loaded.config.block_out_channels == [12, 24] == list(model.config.block_out_channels)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert loaded.time_proj.num_channels == model.time_proj.num_channels == 16  # not the config's 12
    assert loaded.down_blocks[0].downsamplers[0].channels == 12
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)

    dit, dit_inputs = pruned_dit()
    save_pretrained(dit, tmp_path / "dit")
    loaded = load_pretrained(tmp_path / "dit")
    assert loaded.config.num_layers == 2 and len(loaded.transformer_blocks) == 2
    assert torch.equal(loaded.pos_embed.pos_embed, dit.pos_embed.pos_embed)


def test_half_precision_weights_keep_their_dtype(tmp_path):
    model, inputs = pruned_unet()
    model = model.to(torch.bfloat16)
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    inputs["sample"] = inputs["sample"].to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


@pytest.fixture
def saved(tmp_path) -> Path:
    model, _ = pruned_unet()
    return save_pretrained(model, tmp_path / "m")


def test_corrupt_structure_file_is_named_in_the_error(saved):
    text = (saved / STRUCTURE_FILE).read_text()
    (saved / STRUCTURE_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{STRUCTURE_FILE} is not valid JSON"):
        load_pretrained(saved)

    (saved / STRUCTURE_FILE).write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a prunedm structure file"):
        load_pretrained(saved)


def test_truncated_or_foreign_weights_are_named_in_the_error(saved, tmp_path):
    weights = saved / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE} does not match .*{STRUCTURE_FILE}: sha256"):
        load_pretrained(saved)

    other, _ = pruned_unet()
    with torch.no_grad():
        other.conv_in.weight.add_(1)
    save_pretrained(other, tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        load_pretrained(saved)


def test_structure_that_does_not_fit_the_weights_is_an_error(saved):
    structure = json.loads((saved / STRUCTURE_FILE).read_text())
    structure["modules"]["conv_in"]["parameters"]["weight"] = [7, 3, 3, 3]
    (saved / STRUCTURE_FILE).write_text(json.dumps(structure))
    with pytest.raises(ValueError, match=rf"(?s){WEIGHTS_FILE} does not fit the structure.*conv_in.weight"):
        load_pretrained(saved)

    structure["class"] = "os.system"
    (saved / STRUCTURE_FILE).write_text(json.dumps(structure))
    with pytest.raises(ValueError, match="not a diffusers model"):
        load_pretrained(saved)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match=STRUCTURE_FILE):
        load_pretrained(tmp_path)


def test_writes_are_atomic(saved, monkeypatch):
    before = {f: (saved / f).read_bytes() for f in (STRUCTURE_FILE, WEIGHTS_FILE)}
    model, _ = pruned_unet()
    with torch.no_grad():
        model.conv_in.bias.add_(1)

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, saved)  # over an existing save
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, saved.parent / "new")  # a new directory
    assert {f: (saved / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]  # no temp files or half directories
    assert sorted(p.name for p in saved.iterdir()) == sorted(before)
    load_pretrained(saved)

    monkeypatch.undo()
    save_pretrained(model, saved)
    assert torch.equal(load_pretrained(saved).conv_in.bias, model.conv_in.bias)
    assert sorted(p.name for p in saved.iterdir()) == sorted(before)


class ScaledLinear(nn.Linear):
    """A module class the config never builds: it needs a structure hook to come back."""

    def __init__(self, in_features, out_features, scale):
        super().__init__(in_features, out_features)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


def test_structure_hooks_rebuild_modules_the_config_does_not_build(tmp_path):
    model, inputs = pruned_unet()
    old = model.time_embedding.linear_2
    swapped = ScaledLinear(old.in_features, old.out_features, scale=0.5)
    swapped.load_state_dict(old.state_dict())
    model.time_embedding.linear_2 = swapped
    hooks = {
        "ScaledLinear": (
            lambda m: {"in": m.in_features, "out": m.out_features, "scale": m.scale},
            lambda extra, built: ScaledLinear(extra["in"], extra["out"], extra["scale"]),
        )
    }
    save_pretrained(model, tmp_path / "m", structure_hooks=hooks)
    assert json.loads((tmp_path / "m" / STRUCTURE_FILE).read_text())["modules"]["time_embedding.linear_2"]["extra"] == {
        "in": 44,
        "out": 44,
        "scale": 0.5,
    }

    with pytest.raises(ValueError, match="is a ScaledLinear but the config builds a Linear"):
        load_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", structure_hooks=hooks)
    assert isinstance(loaded.time_embedding.linear_2, ScaledLinear) and loaded.time_embedding.linear_2.scale == 0.5
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)
