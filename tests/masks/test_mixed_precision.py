"""The mask learners' mixed precision in one process (compute_dtype bf16): the frozen model stored and run in bf16,
its output cast to fp32 as FSDP2's policy would, logits, gradients and optimizer state fp32, the same sampled
masks as in fp32, states that say their precision, and the settings it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunedm.masks import MaskLLMLearner, MaskProLearner

BF16 = torch.bfloat16


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(16, 32)
        self.transformer_blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(2))
        self.proj_out = nn.Linear(32, 8)

    def forward(self, x):
        h = self.proj_in(x)
        for block in self.transformer_blocks:
            h = h + block(h)
        return self.proj_out(h)


def _mse(model, batch):
    x, y = batch
    out = model(x)
    assert out.dtype == torch.float32  # the root's output cast, as MixedPrecisionPolicy(output_dtype=fp32)
    return nn.functional.mse_loss(out, y)


def _batch(step: int = 0):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)


def _learner(kind: str, dtype=BF16, **kwargs):
    torch.manual_seed(0)
    if kind == "maskpro":
        return MaskProLearner(Blocks(), _mse, preset="short", total_steps=4, logit_init=1.0, compute_dtype=dtype)
    return MaskLLMLearner(Blocks(), _mse, preset="official", total_steps=4, compute_dtype=dtype, **kwargs)


@pytest.mark.parametrize("kind", ["maskllm", "maskpro"])
def test_bf16_model_fp32_logits_and_the_fp32_samples(kind):
    fp32, bf16 = _learner(kind, None), _learner(kind)
    assert {p.dtype for p in bf16.model.parameters()} == {BF16}
    for name, logits in fp32.logits.items():  # set up from the fp32 weights: the same logits and samples
        assert bf16.logits[name].dtype == torch.float32 and torch.equal(bf16.logits[name], logits)
    for name, matrix in fp32.sample().items():
        assert torch.equal(bf16.sample()[name], matrix)
    losses = {
        key: [learner.step(_batch(s))["loss"] for s in range(3)] for key, learner in [("fp32", fp32), ("bf16", bf16)]
    }
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16
    for logits in bf16.logits.values():
        assert logits.dtype == logits.grad.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in bf16.mask_optimizer.state[logits].values() if v.dim())


def test_maskllm_gradient_reaches_the_logits_in_fp32_and_regularizer_reads_bf16_weights():
    learner = _learner("maskllm", weight_reg=1e-3)
    before = {k: v.detach().clone() for k, v in learner.logits.items()}
    learner.step(_batch())
    assert all(not torch.equal(before[k], v) for k, v in learner.logits.items())


def test_state_records_the_precision_and_resume_is_exact(tmp_path):
    learner = _learner("maskllm")
    learner.step(_batch(0))
    learner.save(tmp_path / "bf16.safetensors")
    learner.step(_batch(1))
    resumed = _learner("maskllm")
    resumed.load(tmp_path / "bf16.safetensors")
    resumed.step(_batch(1))
    for name, logits in learner.logits.items():
        assert torch.equal(resumed.logits[name], logits)
    with pytest.raises(ValueError, match="compute_dtype bfloat16, this learner computes in float32"):
        _learner("maskllm", None).load(tmp_path / "bf16.safetensors")


def test_refused_settings_and_finalize():
    with pytest.raises(ValueError, match="compute_dtype must be None or torch.bfloat16"):
        _learner("maskllm", torch.float16)
    with pytest.raises(ValueError, match="model_lr must be 0"):
        MaskProLearner(Blocks(), _mse, model_lr=1e-3, compute_dtype=BF16)
    learner = _learner("maskllm")
    masks = learner.finalize()
    with pytest.raises(RuntimeError, match="same dtype"):  # the policy's input casts are gone with the mask hooks
        learner.model(_batch()[0])
    assert learner.model(_batch()[0].to(BF16)).dtype == BF16
    for name, module in learner.targets.items():
        assert torch.equal(module.weight != 0, masks[name] & (module.weight != 0))
