"""Mask learning in 2 processes on the gloo backend (CPU): each rank learns from its own batches, and the
logits and masks stay identical across ranks, equal to what one process learns from the averaged signal."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import prunedm

pytestmark = [
    pytest.mark.skipif(not prunedm.extension_info()["cpu"]["usable"], reason="extension not built"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
    pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous"),
]

WORLD = 2
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(64, 16, generator=g) * torch.logspace(-1, 1, 16)
    return x, torch.randn(64, 8, generator=g)


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _learner(kind: str, model: nn.Module):
    from prunedm import masks as pm

    if kind == "maskllm":
        return pm.MaskLLMLearner(model, _mse, total_steps=STEPS, model_lr=1e-2)
    return pm.MaskProLearner(model, _mse, logit_init=2.0, mask_lr=0.5, model_lr=1e-2)


def _worker(rank: int, kind: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        learner = _learner(kind, model)
        for _ in range(STEPS):
            learner.step(_batch(rank))
        state = {f"logits.{k}": v.detach().clone() for k, v in learner.logits.items()}
        state.update({f"mask.{k}": v for k, v in learner.masks().items()})
        state.update({f"param.{k}": v.detach().clone() for k, v in model.named_parameters()})
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["maskllm", "maskpro"])
def test_two_ranks_keep_identical_masks(kind, tmp_path):
    mp.spawn(_worker, args=(kind, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # The ranks really learned from both batches: one process on rank 0's batch alone ends elsewhere.
    single = _learner(kind, _model())
    for _ in range(STEPS):
        single.step(_batch(0))
    assert any(not torch.equal(single.logits[k].detach(), ranks[0][f"logits.{k}"]) for k in single.logits)
