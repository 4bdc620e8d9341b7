"""EcoDiff on a tiny DiT: the end-to-end final-latent objective against a chain run by hand, the time-step
checkpointed backward equal to the plain one, bounded gate noise, the L1 penalty, keep-ratio binarisation."""

from __future__ import annotations

import math

import pytest
import torch

from prunedm.structural import DDIMChain, EcoDiffLearner, binarize_keep_ratio, hard_concrete_sample

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()  # fmt: skip


def batch():
    return (torch.zeros(2, 4, 8, 8), torch.tensor([3, 7]))


def learner(**kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return EcoDiffLearner(tiny_dit(), init_logit=0.5, **kwargs)


def fixed_noise(lrn, seed=5):
    return lrn._noise(torch.Generator().manual_seed(seed))


def test_end_to_end_loss_is_the_final_latent_distance_of_the_whole_chain():
    lrn = learner()
    noise = fixed_noise(lrn)
    distance = lrn.end_to_end_backward(batch(), noise, checkpointed=False)

    chain, model, labels = DDIMChain(3), lrn.model, batch()[1]
    assert chain.timesteps == [666, 333, 0]
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(gates):
        lrn.use_gates(gates)
        x = x0.clone()
        with torch.no_grad():
            for i, t in enumerate(chain.timesteps):
                a = chain.alphas_cumprod[t].item()
                a_next = chain.alphas_cumprod[chain.timesteps[i + 1]].item() if i < 2 else 1.0
                eps = model(x, timestep=torch.full((2,), t), class_labels=labels).sample[:, :4]
                clean = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
                x = math.sqrt(a_next) * clean + math.sqrt(1 - a_next) * eps
        lrn.use_gates(None)
        return x

    with torch.no_grad():
        gates = lrn.sample_gates(noise)
    expected = ((run(gates) - run(None)) ** 2).mean()
    assert expected > 0
    torch.testing.assert_close(distance, expected, rtol=1e-5, atol=1e-8)
    assert any(float((g < 1).sum()) for g in gates.values())  # the gates do close something


def test_checkpointed_backward_equals_the_plain_backward():
    lrn = learner()
    noise = fixed_noise(lrn)
    plain = lrn.end_to_end_backward(batch(), noise, checkpointed=False)
    plain_grads = {n: p.grad.clone() for n, p in lrn.logits.items()}
    for p in lrn.logits.values():
        p.grad = None
    checkpointed = lrn.end_to_end_backward(batch(), noise, checkpointed=True)
    torch.testing.assert_close(checkpointed, plain)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for name, p in lrn.logits.items():
        torch.testing.assert_close(p.grad, plain_grads[name], rtol=1e-4, atol=1e-9)


def test_a_step_trains_the_gates_and_resumes_from_its_state(tmp_path):
    lrn = learner()
    before = {n: p.detach().clone() for n, p in lrn.logits.items()}
    stats = lrn.step(batch())
    assert stats["distance"] > 0 and stats["total"] == 2 * 2 + 2 * 64  # heads and FFN units (4 x 16) of two blocks
    assert any(not torch.equal(before[n], p) for n, p in lrn.logits.items())
    assert isinstance(lrn.optimizer, torch.optim.AdamW)
    lrn.save(tmp_path / "state.safetensors")
    again = learner()
    again.load(tmp_path / "state.safetensors")
    assert again.step_count == 1
    for name, p in lrn.logits.items():
        torch.testing.assert_close(again.logits[name], p)


def test_bounded_noise_keeps_a_large_logit_open():
    u = torch.tensor([1e-6, 0.5, 1 - 1e-6])
    log_alpha = torch.full((3,), 3.0)
    unbounded = hard_concrete_sample(log_alpha, u)
    bounded = hard_concrete_sample(log_alpha, u, eps=0.5)
    assert unbounded[0] == 0  # logit(1e-6) = -13.8 closes even a logit of 3
    # eps 0.5: noise in +-log(3); sigmoid((3 - 1.0986) / 0.83) * 1.2 - 0.1 = 0.9255 at the low end.
    assert bounded[0].item() == pytest.approx(1.2 / (1 + math.exp(-(3 - math.log(3)) / 0.83)) - 0.1, rel=1e-5)
    torch.testing.assert_close(bounded[1], unbounded[1])
    assert (bounded > 0.9).all()


def test_l1_penalty_is_the_mean_over_layers_of_the_mean_absolute_logit_per_kind():
    lrn = learner()
    with torch.no_grad():
        for i, p in enumerate(lrn.logits.values()):
            p.copy_(torch.linspace(-1.0, 2.0, p.numel()) * (i + 1))
    by_kind = {}
    for name, p in lrn.logits.items():
        by_kind.setdefault(lrn.targets[name].kind, []).append(p.abs().mean())
    expected = sum(sum(v) / len(v) for v in by_kind.values())
    torch.testing.assert_close(lrn.sparsity(), expected)
    squashed = learner(l1_sigmoid=(0.4, 1.0))
    value = sum(
        torch.stack([torch.sigmoid(0.4 * p + 1).mean() for n, p in squashed.logits.items()
                     if squashed.targets[n].kind == kind]).mean()
        for kind in ("heads", "ffn")
    )  # fmt: skip
    torch.testing.assert_close(squashed.sparsity(), value)


def test_keep_ratio_binarisation_hits_the_ratio_globally_and_per_layer():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(10, generator=g), "b": torch.randn(30, generator=g), "h": torch.randn(8, generator=g)}
    kinds = {"a": "ffn", "b": "ffn", "h": "heads"}
    per_layer = binarize_keep_ratio(scores, 0.3, "per_layer", kinds)
    assert [int(per_layer[n].sum()) for n in ("a", "b", "h")] == [3, 9, 2]
    glob = binarize_keep_ratio(scores, 0.25, "global", kinds)
    assert int(glob["a"].sum() + glob["b"].sum()) == 10 and int(glob["h"].sum()) == 2
    ffn = torch.cat([scores["a"], scores["b"]])
    threshold = ffn.sort(descending=True).values[9]
    assert torch.equal(torch.cat([glob["a"], glob["b"]]), ffn >= threshold)
    ties = binarize_keep_ratio({"t": torch.zeros(4)}, 0.5, "per_layer")
    assert ties["t"].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="keep_ratio"):
        binarize_keep_ratio(scores, 1.5)
    with pytest.raises(ValueError, match="scope"):
        binarize_keep_ratio(scores, 0.5, "layer")


def test_apply_at_a_keep_ratio_removes_exactly_the_rest():
    lrn = learner()
    masks = lrn.keep_ratio_masks(0.5, "per_layer")
    assert all(int(m.sum()) == m.numel() // 2 for m in masks.values())
    report = lrn.apply(keep_ratio=0.5, scope="per_layer")
    ffn = [m for m in lrn.model.modules() if isinstance(m, diffusers.models.attention.FeedForward)]
    assert all(f.net[2].in_features == 32 for f in ffn)
    assert report is not None
    with pytest.raises(ValueError, match="preset"):
        EcoDiffLearner(tiny_dit(), preset="sd9")
    with pytest.raises(ValueError, match="masking_eps"):
        EcoDiffLearner(tiny_dit(), masking_eps=1.5)
