"""Order of operations: prune before sparsify (refused fast the other way round), finetune the masked dense
model rather than the packed one (refused, with the fix), and pruning inside torch.no_grad()."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import UNet2DModel

from prunedm import prune_channels, sparsify
from prunedm.masks.targets import apply_masks, find_targets, magnitude_masks
from prunedm.nn import SparseConv2d, SparseLinear
from prunedm.nn.sparsify import ineligible_reason
from prunedm.train import FinetuneConfig, finetune
from prunedm.train.finetune import nm_sparse_masks

pytestmark = [pytest.mark.usefixtures("one_thread_module"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()  # fmt: skip


def finetune_config(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False, **overrides})


def images() -> torch.Tensor:
    return torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def test_prune_after_sparsify_is_refused_at_once_and_changes_nothing():
    model = tiny_unet()
    sparsify(model)
    first = next(n for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d)))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    start = time.perf_counter()
    with pytest.raises(ValueError, match="prune before sparsify") as error:
        prune_channels(model, "magnitude", 0.3)
    assert time.perf_counter() - start < 1.0  # it ran 12+ minutes inside torch-pruning's grouping
    assert repr(first) in str(error.value) and "SparseLinear" in str(error.value)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_finetune_of_a_sparsified_model_is_refused_with_the_fix(tmp_path):
    model = tiny_unet()
    report = sparsify(model)
    with pytest.raises(ValueError, match="keep_sparsity") as error:
        finetune(model, images(), tmp_path / "out", finetune_config())
    assert f"{len(report.converted)} packed 2:4 layer(s)" in str(error.value) and "then sparsify" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_fix_finetunes_the_masked_dense_model_then_sparsifies(tmp_path):
    model = tiny_unet()
    targets, _ = find_targets(model)
    apply_masks(model, magnitude_masks(targets))  # the masked dense model: 2:4 zeros, still nn.Linear / nn.Conv2d
    masks = nm_sparse_masks(model)
    assert set(masks) == set(targets)
    before = {name: module.weight.detach().clone() for name, module in targets.items()}

    finetune(model, images(), tmp_path / "out", finetune_config(keep_sparsity=True))

    for name, module in targets.items():  # every masked layer trained its kept weights, the pattern held
        assert not torch.equal(before[name], module.weight), name
        assert torch.equal(module.weight != 0, masks[name]), name
    report = sparsify(model, masks=masks)
    assert {layer.name for layer in report.converted} == {n for n, m in targets.items() if ineligible_reason(m) is None}
    assert len(report.converted) > 20


def test_prune_channels_inside_no_grad_matches_pruning_with_grad():
    reference, model = tiny_unet(), tiny_unet()
    expected = prune_channels(reference, "magnitude", 0.5)
    with torch.no_grad():  # a typical inference script; torch-pruning's tracing needs autograd
        report = prune_channels(model, "magnitude", 0.5)
    assert report.widths_after == expected.widths_after and report.params_after == expected.params_after
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    assert model.conv_in.out_channels == 8


def test_gradient_importance_inside_no_grad():
    data = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))]
    reference, model = tiny_unet(), tiny_unet()
    prune_channels(reference, "taylor", 0.5, data=data, timesteps=[10, 500])
    with torch.no_grad():
        report = prune_channels(model, "taylor", 0.5, data=data, timesteps=[10, 500])
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert report.gradient_pass.timesteps == [10, 500] and len(report.gradient_pass.losses) == 2
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    assert all(p.grad is None for p in model.parameters())
