"""Masked finetuning: FinetuneConfig(keep_sparsity=True) keeps every 2:4 weight's zero pattern, in the model
and its EMA, and a resumed run still matches an uninterrupted one exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from prunedm import masks as pm
from prunedm import ops
from prunedm.train import FinetuneConfig, finetune
from prunedm.train.finetune import nm_sparse_masks

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def masked_unet(seed: int = 0) -> tuple[UNet2DModel, dict[str, torch.Tensor]]:
    """A tiny UNet with a magnitude 2:4 mask on every eligible Linear/Conv2d; returns it and the masks."""
    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    targets, _ = pm.find_targets(model)
    masks = pm.magnitude_masks(targets)
    pm.apply_masks(model, masks)
    return model, masks


def images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def config(**overrides) -> FinetuneConfig:
    values = {"steps": 4, "batch_size": 4, "lr": 1e-2, "ema_decay": 0.5, "progress": False, "keep_sparsity": True}
    return FinetuneConfig(**{**values, **overrides})


def gemm(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    return ops.conv_weight_to_matrix(weight) if weight.dim() == 4 else weight


def test_nm_sparse_masks_finds_exactly_the_masked_layers():
    model, masks = masked_unet()
    found = nm_sparse_masks(model)
    assert set(found) == set(masks) and len(found) > 5
    for name, mask in found.items():
        assert torch.equal(mask, dict(model.named_modules())[name].weight != 0)
    dense, _ = masked_unet()
    torch.manual_seed(3)
    for p in dense.parameters():
        p.data.normal_()
    assert nm_sparse_masks(dense) == {}


def test_keep_sparsity_keeps_the_2to4_pattern_in_model_and_ema(tmp_path):
    model, masks = masked_unet()
    before = {name: dict(model.named_modules())[name].weight.detach().clone() for name in masks}
    result = finetune(model, images(), tmp_path, config())
    modules, ema_modules = dict(model.named_modules()), dict(result.ema_model.named_modules())
    for name, mask in masks.items():
        for weight in (modules[name].weight.detach(), ema_modules[name].weight.detach()):
            assert ops.is_nm_sparse(gemm(modules[name], weight), 2, 4), name
            assert torch.equal(weight != 0, mask), name  # the same kept positions, all still non-zero
        assert not torch.equal(modules[name].weight.detach(), before[name]), f"{name} did not train"


def test_without_keep_sparsity_the_mask_is_lost(tmp_path):
    model, masks = masked_unet()
    finetune(model, images(), tmp_path, config(keep_sparsity=False))
    modules = dict(model.named_modules())
    broken = [name for name in masks if not ops.is_nm_sparse(gemm(modules[name], modules[name].weight.detach()))]
    assert len(broken) == len(masks)


def test_resume_with_keep_sparsity_is_exact(tmp_path):
    straight, masks = masked_unet()
    result = finetune(straight, images(), tmp_path / "straight", config())
    first, _ = masked_unet()
    finetune(first, images(), tmp_path / "split", config(steps=2))
    resumed, _ = masked_unet()  # a fresh masked model, as a restarted process would build
    resumed_result = finetune(resumed, images(), tmp_path / "split", config(), resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in result.ema_model.state_dict().items():
        assert torch.equal(resumed_result.ema_model.state_dict()[key], value), key
    modules = dict(resumed.named_modules())
    for name, mask in masks.items():
        assert torch.equal(modules[name].weight.detach() != 0, mask)
