"""Structural (EcoDiff-style) head/FFN gates on tiny random-init diffusers models on the CPU: the gate math,
learning that closes gates while the output stays close, physical removal that computes exactly what the
gated model did (DiT, UNet2DConditionModel, SD3, Flux), pruned models through save/load in a fresh
process, learner state round trips, and the errors."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build

import prunedm
from prunedm import structural as st
from prunedm.structural import StructuralGateLearner

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_dit(num_layers=2):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=num_layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()  # fmt: skip


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8,
    ).eval()  # fmt: skip


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 2, 2),
    ).eval()  # fmt: skip


def batch_for(name: str, n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if name == "dit":
        return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    if name == "unet2d":
        return torch.randn(n, 3, 8, 8, generator=g)
    context = torch.randn(n, 5, 16, generator=g)
    if name == "unet":
        return {"latents": torch.randn(n, 4, 8, 8, generator=g), "encoder_hidden_states": context}
    pooled = torch.randn(n, 16, generator=g)
    if name == "sd3":
        return {"latents": torch.randn(n, 4, 8, 8, generator=g), "encoder_hidden_states": context,
                "pooled_projections": pooled}  # fmt: skip
    return {"latents": torch.randn(n, 16, 4, generator=g), "encoder_hidden_states": context,
            "pooled_projections": pooled, "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)}  # fmt: skip


def tiny_unet2d():
    return build("UNet2DModel")  # tests/tiny_models.py's UNet2DModel, seed 0, eval


MODELS = {"dit": tiny_dit, "unet": tiny_unet, "sd3": tiny_sd3, "flux": tiny_flux, "unet2d": tiny_unet2d}


@torch.no_grad()
def output(model, batch):
    latents = st.learner._split_batch(batch)[0]
    return st.denoiser_output(model, batch, latents, torch.linspace(7, 640, latents.shape[0]).long())


# ---- gate math ----


def test_hard_concrete_gate_math():
    log_alpha = torch.tensor([-10.0, -2.0, 0.0, math.log(11.0), 10.0])
    evals = st.hard_concrete_eval(log_alpha)
    # sigmoid(la) * 1.2 - 0.1, clamped: 0 below la = -log 11, 1 above la = log 11.
    expected = (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(evals, expected)
    assert evals[0] == 0 and evals[2] == pytest.approx(0.5) and evals[3] == pytest.approx(1.0) and evals[4] == 1

    grid = torch.linspace(-8, 8, 101)
    l0 = st.hard_concrete_l0(grid)
    assert bool((l0.diff() > 0).all()) and 0 < float(l0[0]) < 0.01 and float(l0[-1]) > 0.99
    torch.testing.assert_close(l0, torch.sigmoid(grid - 0.83 * math.log(0.1 / 1.1)))

    # Samples: in [0, 1], and P(gate > 0) is the L0 term.
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, generator=g).clamp(1e-6, 1 - 1e-6)
    for la in (-1.0, 0.5, 2.0):
        gates = st.hard_concrete_sample(torch.full_like(u, la), u)
        assert float(gates.min()) == 0.0 and float(gates.max()) == 1.0
        l0 = float(st.hard_concrete_l0(torch.tensor(la)))
        assert float((gates > 0).float().mean()) == pytest.approx(l0, abs=5e-3)


def test_gumbel_and_sigmoid_gates():
    logits = torch.tensor([-2.0, 0.0, 1.5], requires_grad=True)
    u = torch.rand(50_000, 3, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    gates = st.gates._gumbel_two_class(logits.expand_as(u), u, tau=0.5)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(gates.detach().mean(0), torch.sigmoid(logits.detach()), atol=1e-2, rtol=0)
    gates.sum().backward()  # straight-through: the soft relaxation's gradient
    assert logits.grad is not None and bool((logits.grad > 0).all())

    model = tiny_dit()
    for gate_type in ("sigmoid", "gumbel_softmax"):
        learner = StructuralGateLearner(copy.deepcopy(model), gate_type=gate_type, init_logit=-1.0, heads=False)
        assert all(not m.any() for m in learner.masks().values())  # eval: hard, logit > 0 keeps
        info = learner.step(batch_for("dit"))
        assert math.isfinite(info["loss"]) and info["kept"] == 0


# ---- learning ----


def _relative_distance(model, reference_out, batch):
    return float((output(model, batch) - reference_out).pow(2).mean() / reference_out.pow(2).mean())


def test_learning_closes_gates_and_keeps_output_close():
    model = tiny_dit()
    original = copy.deepcopy(model)
    data = [batch_for("dit", n=8, seed=s) for s in range(4)]
    learner = StructuralGateLearner(model, sparsity_weight=0.1, lr=0.1, timesteps_per_step=2, seed=0)
    total = sum(p.numel() for p in learner.logits.values())
    first = learner.step(data[0])
    assert first["kept"] == total
    for step in range(1, 120):
        info = learner.step(data[step % len(data)])
    masks = learner.masks()
    kept = {name: int(m.sum()) for name, m in masks.items()}
    assert sum(kept.values()) < 0.5 * total and info["sparsity"] < first["sparsity"]

    held_out = batch_for("dit", n=8, seed=99)
    reference = output(original, held_out)
    report = learner.apply()
    learned = _relative_distance(model, reference, held_out)
    # The same number of heads/units per module, removed at random, moves the output further.
    g = torch.Generator().manual_seed(0)
    random_distances = []
    for _ in range(3):
        randomly = copy.deepcopy(original)
        random_masks = {}
        for name, mask in masks.items():
            keep = torch.zeros(mask.numel(), dtype=torch.bool)
            keep[torch.randperm(mask.numel(), generator=g)[: int(mask.sum())]] = True
            random_masks[name] = keep
        st.apply_structural_masks(randomly, random_masks)
        random_distances.append(_relative_distance(randomly, reference, held_out))
    emptied = copy.deepcopy(original)
    st.apply_structural_masks(emptied, {name: torch.zeros_like(mask) for name, mask in masks.items()})
    everything = _relative_distance(emptied, reference, held_out)
    print(f"\nstructural gates: kept {sum(kept.values())}/{total} {kept}, params {report.params_ratio:.3f}, "
          f"relative output distance {learned:.4f} (same counts removed at random: best of 3 "
          f"{min(random_distances):.4f}; everything removed: {everything:.4f})")  # fmt: skip
    assert learned < 0.02 and learned < 0.8 * min(random_distances) and learned < 0.25 * everything

    # Without the sparsity term nothing closes.
    keep_all = StructuralGateLearner(copy.deepcopy(original), sparsity_weight=0.0, lr=0.1)
    for step in range(5):
        keep_all.step(data[step % len(data)])
    assert all(bool(m.all()) for m in keep_all.masks().values())


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    batch = batch_for("unet")
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(st.learner, "checkpoint", counted)
    grads = []
    for flag in (False, True):
        learner = StructuralGateLearner(tiny_unet(), gradient_checkpointing=flag, timesteps_per_step=3, seed=3)
        info = learner.step(batch)
        grads.append(({n: p.grad.clone() for n, p in learner.logits.items()}, info["loss"]))
        assert len(calls) == (3 if flag else 0)  # one checkpointed forward per timestep
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-6)
    for name, grad in grads[0][0].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[1][0][name], grad, rtol=1e-5, atol=1e-9)


def test_learner_state_round_trip(tmp_path):
    model = tiny_dit()
    batch = batch_for("dit", n=4)
    learner = StructuralGateLearner(copy.deepcopy(model), sparsity_weight=0.5, lr=0.2)
    for _ in range(3):
        learner.step(batch)
    learner.save(tmp_path / "gates.safetensors")
    resumed = StructuralGateLearner(copy.deepcopy(model), sparsity_weight=0.5, lr=0.2)
    resumed.load(tmp_path / "gates.safetensors")
    assert resumed.step_count == 3
    for name, gate in learner.gates().items():
        assert torch.equal(resumed.gates()[name], gate)
    # Resuming continues exactly: same draws (seed, step) and the same optimizer moments.
    assert learner.step(batch)["loss"] == resumed.step(batch)["loss"]
    for name, p in learner.logits.items():
        assert torch.equal(resumed.logits[name], p)
    other = StructuralGateLearner(copy.deepcopy(model), gate_type="sigmoid")
    with pytest.raises(ValueError, match="gate_type"):
        other.load(tmp_path / "gates.safetensors")


def test_learner_refuses_a_state_file_of_the_older_layout(tmp_path):
    from prunedm.masks.state import save_state_file

    learner = StructuralGateLearner(tiny_dit(), timesteps_per_step=1)
    learner.step(batch_for("dit", n=2))
    tensors, meta = learner.state_dict()
    assert sorted(meta["optimizers"]) == ["optimizer"] and any(k.startswith("learner.") for k in tensors)
    # Before the learners shared one save/resume flow: gate.<name> tensors and meta["optimizer"].
    old = {(f"gate.{k[8:]}" if k.startswith("learner.") else k): v for k, v in tensors.items()}
    old_meta = {k: v for k, v in meta.items() if k not in ("optimizers", "extra")}
    save_state_file(tmp_path / "old.safetensors", old, {**old_meta, "optimizer": meta["optimizers"]["optimizer"]})
    before = {n: p.detach().clone() for n, p in learner.logits.items()}
    with pytest.raises(ValueError, match=r"old\.safetensors: StructuralGateLearner: state written by an older prunedm"):
        learner.load(tmp_path / "old.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in learner.logits.items()) and learner.step_count == 1


# ---- removal ----


def _test_gates(learner, empty: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Eval-style gates: the named modules fully closed, elsewhere ~30% closed and ~20% at 0.7."""
    g = torch.Generator().manual_seed(seed)
    gates = {}
    for name, param in learner.logits.items():
        gate = torch.ones(param.shape)
        if name not in empty:
            r = torch.rand(param.shape, generator=g)
            gate[r < 0.3] = 0.0
            gate[(r >= 0.3) & (r < 0.5)] = 0.7
            gate[0] = 1.0  # at least one head/unit stays
        else:
            gate.zero_()
        gates[name] = gate
    return gates


EMPTY = {
    # A whole block (attention and FFN) of DiT and of the UNet's first transformer, and single parts.
    "dit": ["transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.2.ff"],
    "unet": [f"down_blocks.0.attentions.0.transformer_blocks.0.{p}" for p in ("attn1", "attn2", "ff")]
    + ["mid_block.attentions.0.transformer_blocks.0.attn2"],
    "sd3": ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.1.ff"],
    "flux": ["transformer_blocks.0.attn", "transformer_blocks.0.ff_context"],
    # UNet2DModel's attentions are residual and run on [B, C, H, W] feature maps.
    "unet2d": ["down_blocks.1.attentions.0"],
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("hard", [False, True], ids=["gate_values", "bool_masks"])
def test_removal_computes_what_the_gated_model_did(name, hard):
    model = tiny_dit(num_layers=3) if name == "dit" else MODELS[name]()
    batch = batch_for(name)
    learner = StructuralGateLearner(model)
    layouts = dict(learner.targets)
    gates = _test_gates(learner, EMPTY[name])
    masks = {n: g > 0 for n, g in gates.items()} if hard else gates
    learner.use_gates(masks)
    gated = output(model, batch)
    learner.remove()
    assert not torch.allclose(gated, output(model, batch))  # the gates did something
    params = sum(p.numel() for p in model.parameters())
    report = st.apply_structural_masks(model, masks)
    torch.testing.assert_close(output(model, batch), gated, rtol=1e-5, atol=1e-5)
    assert report.params_before == params and report.params_after < params
    assert sorted(report.emptied) == sorted(EMPTY[name])
    kept = {n: int((g > 0).sum()) for n, g in gates.items()}
    assert report.heads_after == sum(kept[n] for n, layout in layouts.items() if layout.kind == "heads")
    modules = dict(model.named_modules())
    for module_name, layout in layouts.items():
        module = modules.get(module_name)
        if layout.kind == "heads" and kept[module_name]:
            width = kept[module_name] * layout.group
            assert module.heads == kept[module_name] and module.inner_dim == width
            assert module.to_q.out_features == width
            if hasattr(
                module, "to_out"
            ):  # Flux single-stream attentions have none (tests/masks/test_structural_flux.py)
                assert module.to_out[0].in_features == width
    if name in ("dit", "unet"):
        assert len(report.residual_blocks) == 1
        assert isinstance(model.get_submodule(report.residual_blocks[0]), st.ResidualBlock)


def test_residual_block_is_identity_without_biases():
    model = tiny_dit()
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.attn1.to_out[0].bias.zero_()
            block.ff.net[2].bias.zero_()
    batch = batch_for("dit")
    masks = {f"transformer_blocks.1.{p}": torch.zeros(u, dtype=torch.bool) for p, u in (("attn1", 2), ("ff", 128))}
    report = st.apply_structural_masks(model, masks)
    assert report.residual_blocks == ["transformer_blocks.1"]
    block, seen = model.transformer_blocks[1], {}
    block.register_forward_hook(lambda m, a, kw, out: seen.update(x=a[0], y=out), with_kwargs=True)
    output(model, batch)
    assert torch.equal(seen["x"], seen["y"])


def _as_dict(batch) -> dict[str, torch.Tensor]:
    if isinstance(batch, dict):
        return dict(batch)
    return {"latents": batch[0], "class_labels": batch[1]}


# Norm gates in the saved models too: removed channels (UNet, ChannelSelectedNorm) and folded masks (DiT).
SAVED_NORMS = {"dit": r"norm3$", "unet": r"transformer_blocks\.0\.norm[13]$"}


def test_pruned_models_save_and_load_in_a_fresh_process(tmp_path):
    for name in ("dit", "unet"):
        model = tiny_dit(num_layers=3) if name == "dit" else MODELS[name]()
        learner = StructuralGateLearner(model, norms=SAVED_NORMS[name])
        gates = _test_gates(learner, EMPTY[name], seed=1)
        learner.remove()
        report = st.apply_structural_masks(model, gates)
        assert report.residual_blocks and (report.channel_selected_norms if name == "unet" else report.masked_norms)
        prunedm.save_pretrained(model, tmp_path / name)
        batch = _as_dict(batch_for(name))
        save_file({**batch, "out": output(model, batch)}, tmp_path / f"{name}.safetensors")
    script = textwrap.dedent(f"""
        import torch, prunedm
        from safetensors.torch import load_file
        torch.set_num_threads(1)
        from prunedm import structural as st
        for name in ("dit", "unet"):
            model = prunedm.load_pretrained({str(tmp_path)!r} + "/" + name)
            batch = load_file({str(tmp_path)!r} + f"/{{name}}.safetensors")
            expected = batch.pop("out")
            with torch.no_grad():
                out = st.denoiser_output(model, batch, batch["latents"], torch.tensor([7, 640]))
            assert torch.equal(out, expected), (name, (out - expected).abs().max())
            kinds = {{type(m).__name__ for m in model.modules()}}
            assert {{"ResidualBlock", "PrunedAttention"}} & kinds, kinds
            assert (name == "unet") == ("ChannelSelectedNorm" in kinds), kinds
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---- norm channel gates ----


def test_norm_gates_remove_channels_where_only_linear_layers_read_them():
    # UNet2DConditionModel's transformer blocks use plain layer_norm: norm1 feeds attn1's q/k/v, norm2
    # the cross-attention's q, norm3 the FeedForward's first projection, and nothing else reads them.
    model = tiny_unet()
    batch = batch_for("unet")
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0"
    learner = StructuralGateLearner(
        model, heads=False, ffn=False, norms=r"transformer_blocks\.0\.norm[123]$", init_logit=0.0, sparsity_weight=0.0
    )
    names = list(learner.targets)
    assert len(names) == 12 and all(learner.targets[n].kind == "norm" for n in names)  # 4 transformers
    block = model.get_submodule(prefix)
    layouts = {a: learner.targets[f"{prefix}.{a}"] for a in ("norm1", "norm2", "norm3")}
    assert layouts["norm1"].out_layers == [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v]
    assert layouts["norm2"].out_layers == [block.attn2.to_q]
    assert layouts["norm3"].out_layers == [block.ff.net[0].proj]
    assert layouts["norm3"].units == 32 and layouts["norm3"].params_per_unit == block.ff.net[0].proj.out_features

    learner.step(batch)  # no sparsity term: the gradient is the output distance's alone
    for name in names:
        assert learner.logits[name].grad.abs().sum() > 0, name

    gates = _test_gates(learner, [])
    seen = {}
    handle = block.norm3.register_forward_hook(lambda m, a, out: seen.update(norm3=out))
    learner.use_gates(gates)
    gated = output(model, batch)
    closed = gates[f"{prefix}.norm3"] == 0
    assert (
        closed.any()
        and bool((seen["norm3"][..., closed] == 0).all())
        and bool((seen["norm3"][..., ~closed] != 0).all())
    )
    handle.remove()
    learner.remove()
    report = st.apply_structural_masks(model, gates)
    torch.testing.assert_close(output(model, batch), gated, rtol=1e-5, atol=1e-5)
    assert sorted(report.channel_selected_norms) == sorted(names) and not report.masked_norms
    kept = {a: int((gates[f"{prefix}.{a}"] > 0).sum()) for a in ("norm1", "norm2", "norm3")}
    assert isinstance(block.norm3, st.norms.ChannelSelectedNorm) and block.norm3.kept.numel() == kept["norm3"]
    assert block.ff.net[0].proj.in_features == kept["norm3"] and block.attn2.to_q.in_features == kept["norm2"]
    assert block.attn1.to_k.in_features == kept["norm1"] and block.attn2.to_k.in_features == 16  # context: stays
    assert report.norm_channels_before == 3 * (32 + 64 + 2 * 32)  # down, mid, 2 up (widths 32, 64, 32)
    assert report.norm_channels_after == sum(int((gates[n] > 0).sum()) for n in names)


def test_norm_gates_are_folded_in_where_channels_cannot_go():
    # DiT's norm3 output is shifted and scaled by adaLN-Zero before the FFN: a closed channel is not
    # zero there, so the gate can only be a mask, folded into the norm (which had no affine weight).
    model = tiny_dit()
    batch = batch_for("dit")
    learner = StructuralGateLearner(model, heads=False, ffn=False, norms=r"norm3$", init_logit=0.0, sparsity_weight=0)
    names = ["transformer_blocks.0.norm3", "transformer_blocks.1.norm3"]
    assert list(learner.targets) == names and all(not learner.targets[n].out_layers for n in names)
    learner.step(batch)
    assert all(learner.logits[n].grad.abs().sum() > 0 for n in names)
    gates = _test_gates(learner, [])
    learner.use_gates(gates)
    gated = output(model, batch)
    learner.remove()
    assert model.transformer_blocks[0].norm3.weight is None
    params = sum(p.numel() for p in model.parameters())
    report = st.apply_structural_masks(model, gates)
    torch.testing.assert_close(output(model, batch), gated, rtol=1e-5, atol=1e-5)
    assert report.masked_norms == names and not report.channel_selected_norms
    assert torch.equal(model.transformer_blocks[0].norm3.weight.detach(), gates[names[0]])
    assert report.params_after == params + 2 * 32  # the gates became the norms' weights; nothing left

    # A GroupNorm (channels on dim 1) with an affine: weight and bias scaled by the gate.
    unet2d = tiny_unet2d()
    learner = StructuralGateLearner(
        unet2d, heads=False, ffn=False, norms=r"^down_blocks\.1\.attentions\.0\.group_norm$"
    )
    (name,) = learner.targets
    assert learner.targets[name].channel_dim == 1
    gates = _test_gates(learner, [])
    learner.use_gates(gates)
    gated = output(unet2d, batch_for("unet2d"))
    learner.remove()
    norm = unet2d.get_submodule(name)
    weight, bias = norm.weight.detach().clone(), norm.bias.detach().clone()
    report = st.apply_structural_masks(unet2d, gates)
    torch.testing.assert_close(output(unet2d, batch_for("unet2d")), gated, rtol=1e-5, atol=1e-5)
    assert report.masked_norms == [name]
    torch.testing.assert_close(norm.weight.detach(), weight * gates[name])
    torch.testing.assert_close(norm.bias.detach(), bias * gates[name])


# ---- targets and errors ----


def test_targets_and_filters():
    targets, skipped = st.find_structural_targets(tiny_flux())
    assert set(targets) == {"transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                            "single_transformer_blocks.0.attn", "single_transformer_blocks.0.proj_mlp"}  # fmt: skip
    assert not skipped
    # A pre-only attention on its own (outside a single-stream block) has nowhere to put gates.
    assert "pre_only" in st.structural_layout(tiny_flux().single_transformer_blocks[0].attn)
    unet = tiny_unet()
    only_cross, _ = st.find_structural_targets(unet, include=r"attn2$")
    assert only_cross and all(n.endswith("attn2") for n in only_cross)
    heads_only, _ = st.find_structural_targets(unet, ffn=False, exclude=r"^mid_block")
    assert heads_only and all(t.kind == "heads" and not n.startswith("mid") for n, t in heads_only.items())
    learner = StructuralGateLearner(unet, include=r"\.ff$")
    assert all(layout.kind == "ffn" for layout in learner.targets.values())


def test_errors():
    model = tiny_dit()
    with pytest.raises(ValueError, match="no_such_block"):
        StructuralGateLearner(model, include=r"no_such_block")
    with pytest.raises(ValueError, match="gate_type"):
        StructuralGateLearner(model, gate_type="relu")
    with pytest.raises(ValueError, match="total_steps"):
        StructuralGateLearner(model, gate_type="gumbel_softmax", temperature=(2.0, 0.1))
    with pytest.raises(ValueError, match="no module named"):
        st.apply_structural_masks(model, {"transformer_blocks.9.attn1": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="1-D tensor of 2"):
        st.apply_structural_masks(model, {"transformer_blocks.0.attn1": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.apply_structural_masks(model, {"transformer_blocks.0.ff": torch.full((128,), 2.0)})
    with pytest.raises(ValueError, match="cannot be pruned"):
        st.apply_structural_masks(model, {"transformer_blocks.0.norm1": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="1-D tensor of 32"):
        st.apply_structural_masks(model, {"transformer_blocks.0.norm3": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="norms pattern"):
        StructuralGateLearner(model, norms=r"no_such_norm")
    # adaLN modules are not plain norms: their inner LayerNorm is what takes gates.
    learner = StructuralGateLearner(model, heads=False, ffn=False, norms=r"\.norm1(\.norm)?$")
    assert set(learner.targets) == {f"transformer_blocks.{i}.norm1.norm" for i in range(2)}
    assert "AdaLayerNormZero" in learner.skipped["transformer_blocks.0.norm1"]
