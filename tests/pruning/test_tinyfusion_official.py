"""TinyFusion as the official code runs it: per-sample keep patterns, scaled logits, LoRA on every Linear,
the EMA decision, and Masked KD's losses on a tiny DiT against values computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunedm.pruning import keep_patterns, learn_depth_keep
from prunedm.pruning.tinyfusion import TINYFUSION_PRESETS, DepthGates, _add_lora, sample_keep_gates
from prunedm.pruning.tinyfusion_loss import class_dropout, keyed_denoising_loss, label_embedders
from prunedm.train.distill import DistillConfig, DistillLoss, block_pairs, masked_feature_mse
from tests.pruning.test_depth import dit_inputs, tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_per_sample_patterns_differ_and_the_batch_forward_equals_each_image_forward():
    model = tiny_dit(num_layers=4)
    patterns = keep_patterns(2, 1)
    logits = torch.zeros(2, 2)
    gates = sample_keep_gates(logits, patterns, tau=1.0, scaling=100.0, batch_size=6,
                              generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert gates.shape == (6, 4)
    assert set(gates.unique().tolist()) == {0.0, 1.0}
    assert (gates.view(6, 2, 2).sum(-1) == 1).all()  # one block of each pair kept, per sample
    assert len({tuple(row.tolist()) for row in gates}) > 1  # the samples do not share one pattern

    inputs = dit_inputs(batch=6)
    hooks = DepthGates(model.transformer_blocks)
    try:
        hooks.gates = gates
        with torch.no_grad():
            batched = model(**inputs).sample
            for i in range(6):
                hooks.gates = gates[i]
                single = model(**{k: v[i : i + 1] for k, v in inputs.items()}).sample
                torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)
    finally:
        hooks.remove()
    assert all(not block._forward_hooks for block in model.transformer_blocks)


def test_scaling_sharpens_the_gumbel_choice():
    patterns = keep_patterns(2, 1)
    logits = torch.tensor([[0.05, 0.0]])
    draws = [sample_keep_gates(logits, patterns, 1.0, s, 2000, torch.Generator().manual_seed(0)) for s in (1, 100)]
    first_kept = [float(d[:, 0].mean()) for d in draws]
    # P(pattern 0) = sigmoid(scaling * 0.05): 0.512 unscaled, 0.993 at x100.
    assert abs(first_kept[0] - 0.512) < 0.04
    assert first_kept[1] > 0.98


def test_official_lora_covers_every_linear_with_alpha_over_rank_scaling():
    model = tiny_dit()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    in_blocks = [m for m in model.transformer_blocks.modules() if isinstance(m, nn.Linear)]
    assert len(linears) > len(in_blocks)  # the adaLN embedders and the output head are outside the blocks
    official = TINYFUSION_PRESETS["official"]
    params, handles = _add_lora(model, model.transformer_blocks, "all", official["lora_rank"],
                                official["lora_alpha"], torch.Generator().manual_seed(0))  # fmt: skip
    try:
        assert len(handles) == len(linears) and len(params) == 2 * len(linears)
        assert all(p.shape[0] == 8 for p in params[::2])
        layer, down, up = linears[0], params[0], params[1]
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            up.fill_(0.1)
            expected = nn.functional.linear(x, layer.weight, layer.bias) + 2.0 * (x @ down.T @ up.T)
            torch.testing.assert_close(layer(x), expected)
    finally:
        for h in handles:
            h.remove()
    _, block_handles = _add_lora(model, model.transformer_blocks, "blocks", 4, 4.0, torch.Generator())
    assert len(block_handles) == len(in_blocks)
    for h in block_handles:
        h.remove()


def test_the_decision_is_the_argmax_of_the_ema_logits():
    model = tiny_dit()
    batches = [(torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2,)))]
    kwargs = dict(group_size=2, keep_per_group=1, steps=3, lora=None)
    plain = learn_depth_keep(model, batches, ema_decay=None, **kwargs)
    torch.testing.assert_close(plain.decision_logits, plain.logits)
    averaged = learn_depth_keep(model, batches, ema_decay=0.5, **kwargs)
    # Same seed, same draws: EMA(0.5) of (0, l1, l2, l3) = 0.5 l3 + 0.25 l2 + 0.125 l1, and never the logits.
    assert not torch.equal(averaged.decision_logits, averaged.logits)
    assert averaged.decision_logits.abs().max() < averaged.logits.abs().max()
    with pytest.raises(ValueError, match="preset"):
        learn_depth_keep(model, batches, preset="paper", **kwargs)
    with pytest.raises(ValueError, match="lora"):
        learn_depth_keep(model, batches, group_size=2, steps=1, lora="heads")


def test_keyed_loss_of_a_batch_split_in_rows_equals_the_joined_batch_and_drops_labels_to_the_null_class():
    from diffusers import DDPMScheduler

    model, scheduler = tiny_dit(), DDPMScheduler(num_train_timesteps=1000)
    latents, labels = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4])
    assert class_dropout(model) == (0.1, 10)  # DiT's own probability; the extra row 10 is the null class

    def loss(rows, first, step=5, dropout=(0.5, 10), y=labels):
        return keyed_denoising_loss(model, (latents[rows], y[rows]), scheduler, 3, step, first, dropout)

    with torch.no_grad():
        joined = loss(slice(None), 0)
        halves = (loss(slice(0, 2), 0) + loss(slice(2, 4), 2)) / 2  # what two ranks' mean gives
        torch.testing.assert_close(halves, joined, rtol=1e-6, atol=0)
        assert not torch.equal(loss(slice(None), 0, step=6), joined)  # each step draws anew
        # Probability 1 drops every label to the null class: the loss of null labels without dropout.
        torch.testing.assert_close(loss(slice(None), 0, dropout=(1.0, 10)),
                                   loss(slice(None), 0, dropout=(0.0, None), y=torch.full((4,), 10)))  # fmt: skip


def test_the_search_turns_the_models_own_label_dropout_off_and_restores_the_mode():
    model = tiny_dit().train()
    seen = []

    def loss_fn(m, batch):
        seen.append([e.training for e in label_embedders(m)])
        return m(batch[0], torch.zeros(2, dtype=torch.long), class_labels=batch[1]).sample.square().mean()

    learn_depth_keep(model, [(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))], steps=2, loss_fn=loss_fn, lora=None)
    assert seen and not any(any(step) for step in seen)  # no embedder drew its own dropout during the search
    assert all(m.training for m in model.modules())
    label_embedders(model)[0].dropout_prob = 0.3  # the blocks would drop a sample's label differently
    with pytest.raises(ValueError, match="different probabilities"):
        class_dropout(model)


def test_masked_feature_mse_by_hand():
    teacher = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 100.0]])  # 100 lies beyond mean + 2 std
    student = torch.tensor([[1.0, 1.0, 2.0, 5.0, 4.0, 0.0]])
    # Teacher: mean 18.33, std 39.9; only 100 is outside 2 std. Student: all within. Kept diffs: 1, 0, 0, 2, 0.
    assert masked_feature_mse(student, teacher, 2.0).item() == pytest.approx((1 + 4) / 6)
    assert masked_feature_mse(student, teacher, None).item() == pytest.approx((1 + 4 + 100**2) / 6)


def test_masked_kd_on_a_tiny_dit_matches_the_loss_computed_by_hand():
    teacher = tiny_dit(num_layers=4)
    student = tiny_dit(num_layers=4)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.transformer_blocks = nn.ModuleList([student.transformer_blocks[1], student.transformer_blocks[3]])
    config = DistillConfig(teacher, keep_indices=[1, 3], feature_decay_steps=4)
    loss_fn = DistillLoss(config, student)
    inputs = dit_inputs(batch=2)
    noisy, t, batch = inputs["hidden_states"], inputs["timestep"], {"class_labels": inputs["class_labels"]}
    target = torch.randn(2, 4, 8, 8)
    loss0 = loss_fn(student, noisy, t, batch, target)
    loss2 = loss_fn(student, noisy, t, batch, target, step=2)
    loss_fn.remove()

    feats = {}

    def keep(name):
        return lambda m, a, out: feats.__setitem__(name, out)

    handles = [teacher.transformer_blocks[j].register_forward_hook(keep(f"t{j}")) for j in (1, 3)]
    handles += [student.transformer_blocks[i].register_forward_hook(keep(f"s{i}")) for i in (0, 1)]
    with torch.no_grad():
        t_out = teacher(noisy, timestep=t, **batch).sample[:, :4]  # the learned-variance half is dropped
        s_out = student(noisy, timestep=t, **batch).sample[:, :4]
    for h in handles:
        h.remove()

    def by_hand(s, tt):
        def inside(x):
            flat = x.reshape(x.shape[0], -1)
            return ((flat - flat.mean(1, keepdim=True)).abs() <= 2 * flat.std(1, keepdim=True)).reshape(x.shape)

        m = inside(s) & inside(tt)
        return ((s * m - tt * m) ** 2).mean()

    output_kd = ((s_out - t_out) ** 2).mean()  # unmasked by default
    gt = ((s_out - target) ** 2).mean()
    features = by_hand(feats["s0"], feats["t1"]) + by_hand(feats["s1"], feats["t3"])
    assert features > 0
    torch.testing.assert_close(loss0.detach(), 0.9 * output_kd + 0.1 * gt + 1e-2 * features)
    # beta decays linearly to 0 over 4 steps: half at step 2.
    torch.testing.assert_close(loss2.detach(), 0.9 * output_kd + 0.1 * gt + 0.5e-2 * features)


def test_block_pairs_need_keep_indices_when_depths_differ():
    teacher, student = tiny_dit(num_layers=4), tiny_dit(num_layers=2)
    with pytest.raises(ValueError, match="keep_indices"):
        block_pairs(student, teacher, None)
    with pytest.raises(ValueError, match="keep_indices"):
        block_pairs(student, teacher, [0, 4])
    assert block_pairs(student, teacher, [0, 2]) == {"transformer_blocks.0": "transformer_blocks.0",
                                                     "transformer_blocks.1": "transformer_blocks.2"}  # fmt: skip
    assert block_pairs(nn.Linear(2, 2), teacher, None) == {}
