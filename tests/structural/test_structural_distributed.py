"""Structural gate learning in 2 processes on the gloo backend (CPU), the model wrapped in
DistributedDataParallel: each rank steps on its own batch (of another size than the other's), and the
gate logits, eval gates and hard masks stay identical across ranks and equal one process stepping on
the two batches concatenated."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
    pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous"),
]

WORLD = 2
STEPS = 4
BATCH_SIZES = (3, 5)  # unequal: each rank's distance is weighted by its share of the global batch


def _model():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()  # fmt: skip


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    n = BATCH_SIZES[rank]
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _learner(model, gradient_checkpointing: bool = False):
    from prunedm.structural import StructuralGateLearner

    # Gates start near closing (eval gate 0 below -2.4), so that some close and some open within STEPS.
    return StructuralGateLearner(
        model,
        sparsity_weight=0.01,
        lr=0.5,
        init_logit=-2.0,
        timesteps_per_step=2,
        seed=5,
        gradient_checkpointing=gradient_checkpointing,
    )


def _state(learner) -> dict[str, torch.Tensor]:
    state = {f"logits.{k}": v.detach().clone() for k, v in learner.logits.items()}
    state.update({f"gate.{k}": v for k, v in learner.gates().items()})
    state.update({f"mask.{k}": v.to(torch.uint8) for k, v in learner.masks().items()})
    return state


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        # The user's usual setup: the model in DDP; the learner unwraps it and syncs the gates itself.
        model = torch.nn.parallel.DistributedDataParallel(_model())
        learner = _learner(model, gradient_checkpointing=True)  # DDP through checkpointed forwards too
        losses = [learner.step(_batch(rank, step))["loss"] for step in range(STEPS)]
        state = _state(learner)
        state["losses"] = torch.tensor(losses)
        save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_learn_the_gates_of_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    losses = [r.pop("losses") for r in ranks]
    assert set(ranks[0]) == set(ranks[1]) and any(k.startswith("mask.") for k in ranks[0])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # bit for bit
    assert not torch.equal(losses[0], losses[1])  # the ranks did see different data

    # One process on the concatenated batches (rank 0's rows first) takes the same steps.
    single = _learner(_model())
    for step in range(STEPS):
        parts = [_batch(rank, step) for rank in range(WORLD)]
        single.step(tuple(torch.cat(items) for items in zip(*parts)))
    expected = _state(single)
    worst = max(float((ranks[0][k] - v).abs().max()) for k, v in expected.items() if k.startswith("logits."))
    print(f"\n2 ranks vs 1 process on the concatenated batch: max |logit difference| {worst:.2e}")
    moved = 0
    for key, value in expected.items():
        torch.testing.assert_close(ranks[0][key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)
        if key.startswith("logits."):
            moved += int((value + 2.0).abs().gt(0.5).sum())
    masks = {k: v for k, v in expected.items() if k.startswith("mask.")}
    closed = sum(int((m == 0).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert moved > 0 and 0 < closed < total, (moved, closed, total)

    # The ranks really learned from both batches: rank 0's batch alone ends elsewhere.
    alone = _learner(_model())
    for step in range(STEPS):
        alone.step(_batch(0, step))
    assert any(not torch.allclose(alone.logits[k].detach(), ranks[0][f"logits.{k}"]) for k in alone.logits)
