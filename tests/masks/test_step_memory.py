"""MaskLLM's step transients: the sample op's input logits * scale is not kept for the backward
(maskllm.scaled_pattern_sample) and each layer's W * M is remade in the backward (prunedm.masks.recompute); both
leave every gradient, logit and mask bitwise as the plain composition gives them (soft and hard masks, masks drawn
up front for the regulariser or when each layer runs, Linear and Conv2d, fp32 and bf16). MaskPro draws each layer's
mask when the layer runs (sharded: one gathered mask at a time), bitwise the masks drawn up front."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunedm.bench.memory import Composed  # the plain composition: gumbel_pattern_sample(logits * scale), W * M kept
from prunedm.masks import MaskLLMLearner


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))])

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.blocks[0](h)


def _loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _same_steps(classes, **kwargs) -> tuple[list, dict]:
    """Learners of `classes` on the same model and batches for 3 steps: each step's info and logits equal."""
    learners = []
    for cls in classes:
        torch.manual_seed(0)
        learners.append(cls(ConvNet(), _loss, total_steps=4, **kwargs))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = (torch.randn(4, 8, 6, 6, generator=g), torch.randn(4, 16, generator=g))
        infos = [learner.step(batch) for learner in learners]
        assert infos[0] == infos[1]
        for name, logits in learners[1].logits.items():
            assert torch.equal(learners[0].logits[name], logits), name
    return learners, infos[0]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("preset", "weight_reg"), [("official", 1e-3), ("short", 0.0)])
def test_step_is_bitwise_the_plain_composition(preset, weight_reg, dtype):
    kwargs = {"preset": preset, "weight_reg": weight_reg, "compute_dtype": dtype}
    learners, _ = _same_steps((MaskLLMLearner, Composed), **kwargs)
    torch.manual_seed(0)
    start = MaskLLMLearner(ConvNet(), _loss, preset=preset, total_steps=4).logits
    assert any(not torch.equal(v, start[k]) for k, v in learners[0].logits.items())


def test_the_masked_weights_are_remade_in_the_backward():
    torch.manual_seed(0)
    learner = MaskLLMLearner(ConvNet(), _loss, preset="short", total_steps=4)
    remade = []
    unpack = learner._recompute._unpack
    learner._recompute._unpack = lambda packed: remade.append(type(packed).__name__) or unpack(packed)
    learner.step((torch.randn(4, 8, 6, 6), torch.randn(4, 16)))
    assert remade.count("_Recipe") == len(learner.targets)  # conv's W * M and each linear's W.t()


@pytest.mark.parametrize("preset", ["official", "short"])
def test_maskpro_masks_drawn_when_run_are_bitwise_the_masks_drawn_up_front(preset):
    from prunedm.bench.memory import ComposedMaskPro  # every layer's mask drawn before the forward
    from prunedm.masks import MaskProLearner

    _, info = _same_steps((MaskProLearner, ComposedMaskPro), preset=preset, logit_init=1.0)
    assert info["advantage"] != 0  # the logits moved
