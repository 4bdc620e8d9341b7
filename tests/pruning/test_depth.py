"""Depth pruning of a tiny DiT: removing blocks, the baselines that choose them, and TinyFusion's learned
keep patterns, checked on a model whose blocks 0 and 2 are exact identities."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from prunedm.pruning import (
    block_influence,
    keep_every,
    keep_most_influential,
    keep_patterns,
    learn_depth_keep,
    prune_depth,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_dit(num_layers: int = 4) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def dit_with_identity_blocks(identity=(0, 2)) -> DiTTransformer2DModel:
    """Blocks in `identity` return their input; every block shares block 0's embedder, as converted
    DiT checkpoints do, so the output head's conditioning does not depend on which blocks remain."""
    model = tiny_dit()
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(model.transformer_blocks):
        block.norm1.emb.load_state_dict(shared)
        if i in identity:
            for layer in (block.attn1.to_out[0], block.ff.net[2]):
                torch.nn.init.zeros_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
    return model


def dit_inputs(batch: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "class_labels": torch.randint(0, 10, (batch,), generator=g),
    }


def test_prune_depth_removes_blocks_updates_config_and_keeps_a_working_model():
    model = dit_with_identity_blocks()
    inputs = dit_inputs()
    with torch.no_grad():
        before = model(**inputs).sample
    block1, block3 = model.transformer_blocks[1], model.transformer_blocks[3]

    report = prune_depth(model, [3, 1])

    assert report.kept == [1, 3] and report.removed == [0, 2]
    assert list(model.transformer_blocks) == [block1, block3]
    assert model.config.num_layers == 2
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # the removed blocks were identities: same output
        torch.testing.assert_close(model(**inputs).sample, before, rtol=1e-5, atol=1e-6)


def test_prune_depth_rejects_bad_indices():
    with pytest.raises(ValueError, match="lie in"):
        prune_depth(tiny_dit(), [0, 4])
    with pytest.raises(ValueError, match="empty"):
        prune_depth(tiny_dit(), [])
    with pytest.raises(ValueError, match="no ModuleList"):
        prune_depth(tiny_dit(), [0], blocks_attr="blocks")


def test_keep_every_and_patterns():
    assert keep_every(28, 2) == list(range(0, 28, 2))
    assert keep_every(6, 3, offset=2) == [2, 5]
    with pytest.raises(ValueError):
        keep_every(6, 2, offset=2)
    patterns = keep_patterns(4, 2)
    assert patterns.shape == (6, 4) and (patterns.sum(1) == 2).all()
    assert len({tuple(row.tolist()) for row in patterns}) == 6
    assert keep_patterns(14, 7).shape == (3432, 14)


def test_block_influence_scores_identity_blocks_zero():
    model = dit_with_identity_blocks()
    scores = block_influence(model, [dit_inputs(seed=1), dit_inputs(seed=2)])
    assert scores.shape == (4,)
    assert scores[0].abs() < 1e-6 and scores[2].abs() < 1e-6
    assert scores[1] > 1e-3 and scores[3] > 1e-3
    assert keep_most_influential(scores, 2) == [1, 3]
    assert all(not block._forward_hooks for block in model.transformer_blocks)


def test_learned_depth_pruning_keeps_the_blocks_that_matter():
    model = dit_with_identity_blocks()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [dit_inputs(batch=2, seed=s) for s in range(2)]
    with torch.no_grad():
        teacher = [model(**b).sample for b in batches]

    def distillation_loss(m, batch):
        index = next(i for i, b in enumerate(batches) if b is batch)
        return torch.nn.functional.mse_loss(m(**batch).sample, teacher[index])

    result = learn_depth_keep(
        model, batches, group_size=2, keep_per_group=1, steps=20, loss_fn=distillation_loss, logits_lr=0.1
    )

    # Dropping an identity block costs nothing; dropping a real one does: 1 of each pair is learned.
    assert result.keep_indices == [1, 3]
    assert result.logits.shape == (2, 2)
    assert (result.probabilities[:, 1] > 0.6).all()
    assert len(result.losses) == 20
    # The search leaves the model as it was: weights, hooks, trainability.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_learned_depth_pruning_with_the_denoising_loss():
    model = tiny_dit()
    batches = [(torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2,))) for _ in range(2)]
    result = learn_depth_keep(model, batches, group_size=4, keep_per_group=2, steps=4)
    assert len(result.keep_indices) == 2 and all(0 <= i < 4 for i in result.keep_indices)
    assert result.patterns.shape == (6, 4)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    prune_depth(model, result.keep_indices)
    assert model(**dit_inputs(batch=1)).sample.shape == (1, 8, 8, 8)

    with pytest.raises(ValueError, match="groups of 3"):
        learn_depth_keep(model, batches, group_size=3, steps=1)


def test_short_preset_keeps_the_earlier_search_and_learns_the_blocks_that_matter():
    model = dit_with_identity_blocks()
    batches = [dit_inputs(batch=2, seed=s) for s in range(2)]
    with torch.no_grad():
        teacher = [model(**b).sample for b in batches]

    def distillation_loss(m, batch):
        index = next(i for i, b in enumerate(batches) if b is batch)
        return torch.nn.functional.mse_loss(m(**batch).sample, teacher[index])

    result = learn_depth_keep(model, batches, steps=20, loss_fn=distillation_loss, preset="short", logits_lr=0.1)
    assert result.keep_indices == [1, 3]
    torch.testing.assert_close(result.decision_logits, result.logits)  # no EMA in the short preset
    assert all(not m._forward_hooks for m in model.modules())
