"""Both mask learners on tiny random-init diffusers models (UNet2DModel, DiTTransformer2DModel) on the
CPU: a denoising loss, exact 2:4 masks on every Linear and Conv2d they target, the pruned model still
runs, and every target matrix of a packable shape goes through compress_2to4 and back."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build
from torch import nn

import prunedm
from prunedm import masks as pm
from prunedm import ops

diffusers = pytest.importorskip("diffusers")
pytestmark = [
    pytest.mark.skipif(not prunedm.extension_info()["cpu"]["usable"], reason="extension not built"),
    pytest.mark.usefixtures("one_thread_module"),
]


def tiny_unet():
    return build("UNet2DModel").train()  # tests/tiny_models.py's UNet2DModel, seed 0


def tiny_dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip


def denoising_loss(model, x0):
    """Epsilon-prediction loss at random timesteps (the learners replay the random stream as needed)."""
    t = torch.randint(0, 1000, (x0.shape[0],))
    noise = torch.randn_like(x0)
    alpha = (1 - t.float() / 1000).view(-1, 1, 1, 1)
    xt = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    if isinstance(model, diffusers.DiTTransformer2DModel):
        prediction = model(xt, timestep=t, class_labels=torch.zeros_like(t)).sample
    else:
        prediction = model(xt, t).sample
    return nn.functional.mse_loss(prediction, noise)


MODELS = {"unet": (tiny_unet, (2, 3, 8, 8)), "dit": (tiny_dit, (2, 4, 8, 8))}
LEARNERS = {
    "maskllm": lambda model: pm.MaskLLMLearner(model, denoising_loss, total_steps=4, weight_reg=0.1),
    "maskpro": lambda model: pm.MaskProLearner(model, denoising_loss, logit_init=3.0, mask_lr=0.5),
}


@pytest.mark.parametrize("kind", list(LEARNERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_learner_on_diffusers_model(model_name, kind, tmp_path):
    make, shape = MODELS[model_name]
    model = make()
    dense = copy.deepcopy(model)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    learner = LEARNERS[kind](model)
    convs = [name for name, module in learner.targets.items() if isinstance(module, nn.Conv2d)]
    assert convs and len(learner.targets) >= 20
    for _ in range(2):
        info = learner.step(x0)
        assert torch.isfinite(torch.tensor(info["loss"]))
    learner.save(tmp_path / "state.safetensors")
    resumed = LEARNERS[kind](copy.deepcopy(dense))
    resumed.load(tmp_path / "state.safetensors")
    masks = learner.finalize()
    for name, mask in resumed.masks().items():
        assert torch.equal(mask, masks[name])

    modules = dict(model.named_modules())
    packed = 0
    for name, mask in masks.items():
        module = modules[name]
        assert mask.dtype == torch.bool and mask.shape == module.weight.shape
        matrix = pm.weight_matrix(module).detach()
        assert ops.nm_violations(matrix, 2, 4) == 0
        assert bool((pm.weight_matrix(module, mask.float()).reshape(-1, 4).sum(-1) == 2).all()), name
        if matrix.shape[0] % 32 == 0 and matrix.shape[1] % 32 == 0:
            half = matrix.half()
            values, meta = ops.compress_2to4(half)
            assert torch.equal(ops.decompress_2to4(values, meta), half)
            packed += 1
    assert packed >= 5
    with torch.no_grad():
        assert torch.isfinite(denoising_loss(model, x0))
    # Weights outside the targets are untouched.
    dense_params = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in masks:
            assert torch.equal(param, dense_params[name]), name


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"])
def test_maskllm_on_conditional_models(name):
    """MaskLLM on the text-conditioned UNet and the joint-attention transformers: the learner distils the
    dense model's output into 2:4 masks on every Linear (and Conv2d) it targets."""
    from tiny_models import build, inputs, run

    model = build(name)
    kwargs = inputs(name)
    target = run(model, kwargs)

    def distill_loss(student, batch):
        return nn.functional.mse_loss(run_with_grad(student, batch), target)

    learner = pm.MaskLLMLearner(model, distill_loss, total_steps=2)
    assert len(learner.targets) >= 10
    assert torch.isfinite(torch.tensor(learner.step(kwargs)["loss"]))
    masks = learner.finalize()
    modules = dict(model.named_modules())
    for module_name, mask in masks.items():
        matrix = pm.weight_matrix(modules[module_name], mask.float())
        assert bool((matrix.reshape(-1, 4).sum(-1) == 2).all()), module_name
    with torch.no_grad():
        assert torch.isfinite(run(model, kwargs)).all()


def run_with_grad(model, kwargs):
    out = model(**kwargs, return_dict=False)[0]
    return out.sample if hasattr(out, "sample") else out
