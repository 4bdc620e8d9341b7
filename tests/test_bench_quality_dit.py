"""bench.quality_dit's dit-ecodiff variant: EcoDiff's gates on a tiny DiT, half the heads and FFN units removed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prunedm.bench import quality_dit, quality_seeds
from prunedm.bench.quality import Budget


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dit_ecodiff_removes_half_the_heads_and_ffn_units(monkeypatch):
    monkeypatch.setattr(quality_dit, "ECODIFF_CHAIN_STEPS", 2)  # the objective's chain: 2 DDIM steps
    model = quality_dit.build_dit(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    before = sum(p.numel() for p in model.parameters())
    data = quality_dit.digits_data()
    budget = Budget(batch_size=4, mask_steps=2, seed=0)
    assert quality_dit.ecodiff_steps(budget) == 1
    pruned = quality_dit.build_variant("dit-ecodiff", data, budget, model=model)
    assert quality_dit.kept_units(pruned) == {"heads": 2, "ffn_units": 64}  # keep ratio 0.5 of 2 x 2, 2 x 64
    # what went: 2 heads (q, k, v rows + out columns, 8 each) and 64 units (in row + bias, out column)
    after = sum(p.numel() for p in pruned.parameters())
    assert before - after == 2 * (3 * 8 * (16 + 1) + 8 * 16) + 64 * (16 + 1 + 16)
    assert not any(p.requires_grad is False for p in pruned.parameters())  # the gates' freeze is undone
    out = pruned(data.images[:2], timestep=torch.tensor([3, 500]), class_labels=data.ids[:2]).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


def test_dit_ecodiff_is_registered_with_a_baseline():
    assert "dit-ecodiff" in quality_dit.DIT_VARIANTS and "dit-ecodiff" in quality_seeds.DEFAULT_VARIANTS
    assert quality_seeds.baseline_of("dit-ecodiff") == "depth-every-k"
    assert quality_dit.DESCRIPTIONS["dit-ecodiff"]


@pytest.mark.skipif(not (quality_dit.DIT_DIR / "config.json").is_file(), reason="the digits DiT is not shipped yet")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_shipped_digits_dit_is_small_loads_as_fp32_and_denoises():
    from diffusers import DDPMScheduler

    from prunedm.data import DigitsDataset

    weights = quality_dit.DIT_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 2_000_000  # fp16 on disk
    info = json.loads((quality_dit.DIT_DIR / "training.json").read_text())
    assert info["steps"] > 0 and math.isfinite(info["fid_1000_ddim25"])
    model = quality_dit.load_dit().eval()
    assert next(model.parameters()).dtype == torch.float32 and len(model.transformer_blocks) == 8
    test = DigitsDataset("test")
    images, labels = test.images[:32], test.labels[:32]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((32,), 300)
    with torch.no_grad():
        predicted = model(DDPMScheduler(num_train_timesteps=1000).add_noise(images, noise, t), t, labels).sample
    assert torch.mean((predicted - noise) ** 2) < 0.3  # predicting zero scores 1.0
