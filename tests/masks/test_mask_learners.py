"""The N:M mask learners (prunedm.masks) on small models: targets, exact N:M masks, the masked-weight
hook, compress_2to4 after applying the masks, save/resume with safetensors, and learned masks beating
the magnitude mask on small regression tasks at equal steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import prunedm
from prunedm import masks as pm
from prunedm import ops
from prunedm.ops import reference

pytestmark = [
    pytest.mark.skipif(not prunedm.extension_info()["cpu"]["usable"], reason="extension not built"),
    pytest.mark.usefixtures("one_thread_module"),
]


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def regression_task(model: nn.Module, d_in: int, batch: int, seed: int, spread: float = 1.0):
    """Inputs whose features differ in scale (so |w| alone is the wrong saliency) and the dense model's
    outputs as targets: the loss of a masked model is its distance from the dense one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        scale = torch.logspace(-spread, spread, d_in)[torch.randperm(d_in, generator=g)]
        x = torch.randn(batch, d_in, generator=g) * scale
        return x, model(x)


def masked_loss(model: nn.Module, masks: dict, batch) -> float:
    pruned = copy.deepcopy(model)
    pm.apply_masks(pruned, masks)
    with torch.no_grad():
        return float(mse(pruned, batch))


def assert_exact_nm(model: nn.Module, masks: dict, n: int = 2, m: int = 4) -> None:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        assert mask.dtype == torch.bool and mask.shape == pm.raw_weight(module).shape, name
        matrix = pm.weight_matrix(module, mask.float())
        assert bool((matrix.reshape(-1, m).sum(-1) == n).all()), name


def mlp(d_in=64, hidden=128, d_out=32):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)  # K = 27: not a multiple of 4, skipped
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # grouped: skipped
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        x = self.depthwise(torch.relu(self.conv(torch.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


# Targets -----------------------------------------------------------------------------------------


def test_find_targets_filters_by_type_and_name():
    net = ConvNet()
    targets, skipped = pm.find_targets(net)
    assert list(targets) == ["conv", "head"]
    assert "not a multiple of m = 4" in skipped["stem"] and "grouped" in skipped["depthwise"]
    assert list(pm.find_targets(net, types=(nn.Linear,))[0]) == ["head"]
    assert list(pm.find_targets(net, include=r"^con")[0]) == ["conv"]
    assert list(pm.find_targets(net, exclude=lambda name, module: name == "conv")[0]) == ["head"]
    # Conv weights are grouped along Cin: the GEMM view is [Cout, kh*kw*Cin].
    assert pm.weight_matrix(net.conv).shape == (32, 288)
    masks = pm.magnitude_masks(targets)
    assert torch.equal(pm.weight_matrix(net.conv, masks["conv"].float()) != 0, ops.nm_mask(pm.weight_matrix(net.conv)))
    assert_exact_nm(net, masks)


def test_set_log_prob_is_the_exact_plackett_luce_set_probability():
    logits = torch.randn(5, 8, dtype=torch.float64)
    for n in (1, 2, 3):
        probabilities = reference.nm_set_probabilities_ref(logits.reshape(10, 4), n)  # [10, C(4, n)]
        patterns = ops.nm_patterns(n, 4)
        for index in range(len(patterns)):
            mask = patterns[index].repeat(5, 2)
            log_prob = pm.set_log_prob(logits, mask, n, 4).reshape(10)
            torch.testing.assert_close(log_prob.double(), probabilities[:, index].log(), rtol=1e-5, atol=1e-6)
    assert torch.equal(pm.top_n_mask(torch.tensor([[0.0, 2.0, 2.0, 1.0]]), 2, 4), torch.tensor([[0, 1, 1, 0]]).bool())


# MaskLLM -----------------------------------------------------------------------------------------


def test_maskllm_beats_magnitude_on_regression():
    model = mlp()
    batch = regression_task(model, 64, 512, seed=0)
    targets, _ = pm.find_targets(model)
    magnitude = masked_loss(model, pm.magnitude_masks(targets), batch)
    steps = 100
    learner = pm.MaskLLMLearner(model, mse, total_steps=steps, mask_lr=5e-2, seed=0)
    first = learner.step(batch)
    assert first["tau"] == 4.0 and first["scale"] == 100.0
    for _ in range(steps - 1):
        info = learner.step(batch)
    assert info["tau"] < 0.1 and info["scale"] > 495
    masks = learner.masks()
    assert_exact_nm(model, masks)
    learned = learner.loss_with_masks(batch)
    assert learned == pytest.approx(masked_loss(model, masks, batch), rel=1e-5)
    print(f"\nMaskLLM, MLP 64-128-32, {steps} steps: magnitude 2:4 loss {magnitude:.4f}, learned {learned:.4f}")
    assert learned < 0.8 * magnitude


def test_maskllm_prior_and_schedules():
    model = mlp(16, 32, 8)
    learner = pm.MaskLLMLearner(model, mse, total_steps=10, prior_strength=100.0, tau=(2.0, 0.5), scale=(1.0, 9.0),
                                schedule="exp")  # fmt: skip
    # With a strong prior the argmax pattern is the prior's: the magnitude mask.
    magnitude = pm.magnitude_masks(learner.targets)
    for name, mask in learner.masks().items():
        assert torch.equal(mask, magnitude[name])
    assert learner.tau == 2.0 and learner.scale == 1.0
    learner.step_count = 5
    assert learner.tau == pytest.approx(1.0) and learner.scale == pytest.approx(3.0)
    learner.step_count = 50
    assert learner.tau == pytest.approx(0.5) and learner.scale == pytest.approx(9.0)
    assert pm.anneal(4.0, 0.05, 0.5, "cosine") == pytest.approx(2.025)
    probabilities = learner.pattern_probabilities()["0"]
    assert probabilities.shape == (32, 4, 6)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(32, 4))
    with pytest.raises(ValueError, match="schedule kind"):
        pm.MaskLLMLearner(mlp(16, 32, 8), mse, schedule="step")
    bad_prior = {
        name: torch.ones_like(pm.raw_weight(m), dtype=torch.bool) for name, m in pm.find_targets(model)[0].items()
    }
    with pytest.raises(ValueError, match="prior mask of .* is not exactly 2:4"):
        pm.MaskLLMLearner(mlp(16, 32, 8), mse, prior=bad_prior)


def test_maskllm_weight_regularizer_and_joint_training():
    model = mlp(16, 32, 8)
    batch = regression_task(model, 16, 64, seed=1)
    dense = [p.detach().clone() for p in model.parameters()]
    learner = pm.MaskLLMLearner(model, mse, total_steps=5, weight_reg=1.0, weight_reg_kind="normalized", model_lr=1e-2,
                                prior=None)  # fmt: skip
    assert all(p.requires_grad for p in model.parameters())
    matrices = learner.sample()
    reg = learner.regularization(matrices)
    assert 0 < float(reg.detach()) < 1
    reg.backward()
    assert all(logits.grad is not None for logits in learner.logits.values())
    for _ in range(3):
        learner.step(batch)
    assert any(not torch.equal(p, d) for p, d in zip(model.parameters(), dense))


def test_maskllm_on_convolutions_groups_along_cin():
    net = ConvNet()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        batch = (x, net(x))
    learner = pm.MaskLLMLearner(net, mse, total_steps=3)
    for _ in range(3):
        learner.step(batch)
    masks = learner.masks()
    assert set(masks) == {"conv", "head"}
    assert_exact_nm(net, masks)
    learner.finalize()
    assert ops.is_nm_sparse(ops.conv_weight_to_matrix(net.conv.weight))
    assert not ops.is_nm_sparse(net.stem.weight.reshape(32, -1)[:, :24])  # untouched


# MaskPro -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_maskpro_beats_magnitude_on_regression(seed):
    model = nn.Linear(32, 8, bias=False)
    batch = regression_task(model, 32, 512, seed=seed, spread=0.7)
    targets, _ = pm.find_targets(model)
    magnitude = masked_loss(model, pm.magnitude_masks(targets), batch)
    steps = 600
    learner = pm.MaskProLearner(model, mse, logit_init=3.0, mask_lr=1.0, seed=seed)
    for _ in range(steps):
        info = learner.step(batch)
    assert info["initial_loss"] == pytest.approx(magnitude, rel=1e-5)  # the initial mask is the magnitude mask
    masks = learner.masks()
    assert_exact_nm(model, masks)
    learned = learner.loss_with_masks(batch)
    print(f"\nMaskPro, Linear 32->8 (seed {seed}), {steps} steps: magnitude 2:4 loss {magnitude:.3f}, "
          f"learned {learned:.3f}")  # fmt: skip
    assert learned < 0.8 * magnitude


def test_maskpro_step_uses_the_same_random_stream_for_both_losses():
    model = mlp(16, 32, 8)
    x = torch.randn(32, 16)

    def noisy_loss(model, batch):
        noise = torch.randn(batch.shape)  # like a diffusion loss's noise and timesteps
        return (model(batch + noise) ** 2).mean()

    learner = pm.MaskProLearner(model, noisy_loss, logit_init=1e4)  # samples are the initial mask
    for _ in range(3):
        info = learner.step(x)
        assert info["loss"] == info["initial_loss"] and info["advantage"] == 0.0
    assert learner.baseline == 0.0


def test_maskpro_initial_mask_and_model_training():
    model = mlp(16, 32, 8)
    batch = regression_task(model, 16, 64, seed=2)
    targets, _ = pm.find_targets(model)
    initial = {name: pm.top_n_mask(torch.randn(pm.raw_weight(m).shape), 2, 4) for name, m in targets.items()}
    learner = pm.MaskProLearner(model, mse, initial_masks=initial, logit_init=10.0, model_lr=1e-2)
    for name, mask in learner.masks().items():
        assert torch.equal(mask, initial[name])
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        learner.step(batch)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="initial mask of .* is not exactly 2:4"):
        pm.MaskProLearner(mlp(16, 32, 8), mse, initial_masks={n: torch.ones_like(m, dtype=torch.bool)
                                                              for n, m in initial.items()})  # fmt: skip


# Shared behaviour --------------------------------------------------------------------------------

LEARNERS = {
    "maskllm": lambda model, loss, **kw: pm.MaskLLMLearner(model, loss, total_steps=8, **kw),
    "maskpro": lambda model, loss, **kw: pm.MaskProLearner(model, loss, logit_init=2.0, mask_lr=0.05, **kw),
}


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_masks_apply_and_compress(kind):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    batch = regression_task(model, 64, 32, seed=3)
    learner = LEARNERS[kind](model, mse)
    for _ in range(4):
        learner.step(batch)
    masks = learner.finalize()
    assert_exact_nm(model, masks)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for name, mask in masks.items():
        weight = dict(model.named_modules())[name].weight
        assert bool((weight[~mask] == 0).all())
        dense = weight.detach().half()
        values, meta = ops.compress_2to4(dense)
        assert torch.equal(ops.decompress_2to4(values, meta), dense)
    # Conv weights compress in their GEMM layout.
    conv = nn.Conv2d(32, 32, 3)
    conv_learner = LEARNERS[kind](conv, lambda model, x: model(x).pow(2).mean())
    conv_learner.step(torch.randn(2, 32, 5, 5))
    conv_learner.finalize()
    matrix = ops.conv_weight_to_matrix(conv.weight.detach()).half()
    values, meta = ops.compress_2to4(matrix)
    assert torch.equal(ops.decompress_2to4(values, meta), matrix)


@pytest.mark.parametrize("kind", list(LEARNERS))
def test_save_and_resume(kind, tmp_path):
    torch.manual_seed(0)
    base = mlp(16, 32, 8)
    batch = regression_task(base, 16, 64, seed=4)

    uninterrupted = LEARNERS[kind](copy.deepcopy(base), mse, seed=5)
    for _ in range(6):
        uninterrupted.step(batch)

    first = LEARNERS[kind](copy.deepcopy(base), mse, seed=5)
    for _ in range(3):
        first.step(batch)
    path = tmp_path / "learner.safetensors"
    first.save(path)
    resumed = LEARNERS[kind](copy.deepcopy(base), mse, seed=123)  # the seed comes from the file
    resumed.load(path)
    assert resumed.step_count == 3
    for _ in range(3):
        resumed.step(batch)
    for name in uninterrupted.logits:
        torch.testing.assert_close(resumed.logits[name], uninterrupted.logits[name], rtol=0, atol=0)
    for name, mask in uninterrupted.masks().items():
        assert torch.equal(resumed.masks()[name], mask)
    if kind == "maskpro":
        assert resumed.baseline == uninterrupted.baseline

    other = pm.MaskLLMLearner(copy.deepcopy(base), mse) if kind == "maskpro" else pm.MaskProLearner(base, mse)
    with pytest.raises(ValueError, match="state is from a"):
        other.load(path)


def test_learner_errors():
    with pytest.raises(ValueError, match="no target layers found"):
        pm.MaskLLMLearner(nn.Sequential(nn.ReLU()), mse)
    with pytest.raises(ValueError, match="needs 0 < n < m"):
        pm.MaskProLearner(mlp(16, 32, 8), mse, n=4, m=4)
    with pytest.raises(ValueError, match="m must be in"):
        pm.MaskLLMLearner(mlp(16, 32, 8), mse, n=2, m=0)
    assert math.comb(4, 2) == pm.MaskLLMLearner(mlp(16, 32, 8), mse).num_patterns
