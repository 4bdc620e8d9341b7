"""bench/layers.py: shape harvesting from the real model configs, and a layer timed and checked on CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")
from prunedm.bench import layers  # noqa: E402


@pytest.fixture(autouse=True)
def private_autotune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path / "cache"))


def test_harvest_real_configs():
    dit = layers.harvest("dit")
    shapes = {layer.shape_text for layer in dit}
    assert "linear 1152x1152 in 256x1152" in shapes  # q, k, v and out projections of DiT-XL/2
    assert "linear 4608x1152 in 256x1152" in shapes and "linear 1152x4608 in 256x4608" in shapes
    qkv = next(layer for layer in dit if layer.shape_text == "linear 1152x1152 in 256x1152")
    assert qkv.count == 28 * 4
    # DiT-XL/2: 28 blocks x (q, k, v, out, mlp in/out, adaLN emb 3 linears) + patch embed conv + class/time
    # embedders + final projections: 255 Linear/Conv2d layers, 9 unique shapes.
    assert len(dit) == 9 and sum(layer.count for layer in dit) == 255
    assert {layer.shape_text: layer.count for layer in dit}["conv 1152x4x2x2 s2 p0 in 4x32x32"] == 1
    ddpm = layers.harvest("ddpm")
    # google/ddpm-cifar10-32's UNet: 113 Linear/Conv2d layers (65 convs), 30 unique (shape, input) pairs.
    assert len(ddpm) == 30 and sum(layer.count for layer in ddpm) == 113
    assert sum(layer.count for layer in ddpm if layer.op == "conv2d") == 65
    assert any(layer.shape_text == "conv 128x128x3x3 s1 p1 in 128x32x32" for layer in ddpm)
    sd15 = layers.harvest("sd15")
    assert any(layer.shape_text == "linear 320x768 in 77x768" for layer in sd15)  # cross-attention k/v
    assert any(layer.shape_text.startswith("conv 320x320x3x3 s1 p1 in 320x64x64") for layer in sd15)


@pytest.mark.parametrize(
    "module, sample_shape",
    [(nn.Linear(64, 96), (8, 64)), (nn.Conv2d(32, 64, 3, padding=1), (32, 8, 8)), (nn.Conv2d(3, 32, 3), (3, 8, 8))],
)
def test_bench_layer_rows(module, sample_shape):
    layer = layers.Layer("test", "layer", 1, module.to("meta"), sample_shape)
    rows = layers.bench_layer(layer, 2, torch.float32, torch.device("cpu"), min_run_time=0.01)
    assert rows[0]["backend"] == "dense" and all(r["ok"] for r in rows)
    if isinstance(module, nn.Conv2d) and module.in_channels == 3:
        assert rows[-1]["ran"] == "skipped" and "in_channels=3" in rows[-1]["note"]
    else:
        expected = ["dense", "sparse[dense]", "sparse[prunedm]", "sparse[auto]"]
        assert [r["backend"] for r in rows] == expected
        assert all(r["device"] == "cpu" and r["ratio_to_dense"] > 0 for r in rows)
        assert all(r["kind"] == "cpu-reference" for r in rows[1:])
        assert [r["ran"] for r in rows if r["backend"] != "sparse[prunedm]"] == ["dense"] * (len(rows) - 1)
        assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]


def test_quick_run_writes_results(tmp_path):
    assert layers.main(["--quick", "--device", "cpu", "--models", "dit", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layers.json").read_text())
    assert data["environment"]["device"].startswith("cpu")
    expected = {"dense", "sparse[dense]", "sparse[auto]"} | {"sparse[prunedm]"}
    assert {r["backend"] for r in data["rows"]} == expected
    assert (tmp_path / "layers.csv").read_text().startswith("model,")
