"""prunedm.save_pretrained stores a sparsified (and channel-pruned) model packed, and
load_pretrained rebuilds it in a fresh process without recompressing."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from diffusers import UNet2DModel
from safetensors import safe_open

import prunedm

_LOAD_AND_RUN = """
import sys, torch, prunedm
model = prunedm.load_pretrained(sys.argv[1])
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x, torch.tensor([10, 500])).sample, sys.argv[3])
kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Sparse")})
print(",".join(kinds))
"""


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()  # fmt: skip


def test_pruned_then_sparsified_model_round_trips_packed(tmp_path):
    model = tiny_unet()
    prunedm.prune_channels(model, importance="magnitude", ratio=0.25)
    report = prunedm.sparsify(model, backend="dense")
    assert report.converted
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x, torch.tensor([10, 500])).sample

    prunedm.save_pretrained(model, tmp_path / "model")
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    converted = [layer.name for layer in report.converted]
    assert all(f"{name}.values" in keys and f"{name}.meta" in keys for name in converted)
    assert not any(f"{name}.weight" in keys for name in converted)
    json.loads((tmp_path / "model" / "structure.json").read_text())

    torch.save(x, tmp_path / "x.pt")
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path / "model"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "SparseConv2d" in out.stdout and "SparseLinear" in out.stdout
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)
