"""Structural gates on FluxTransformer2DModel's single-stream blocks (pre-only attention whose output and
the MLP's activation are concatenated into proj_out) and its double-stream blocks' context projections:
targets, what the gates compute, learning, physical removal equal to the gated model, and a pruned Flux
through save_pretrained / load_pretrained in a fresh process."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import prunedm
from prunedm import structural as st
from prunedm.structural import StructuralGateLearner

diffusers = pytest.importorskip("diffusers")

HEADS, HEAD_DIM, DIM, MLP = 2, 8, 16, 64
SINGLE = [f"single_transformer_blocks.{i}" for i in range(2)]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 2, 2),
    ).eval()  # fmt: skip


def flux_batch(n: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(n, 16, 4, generator=g), "encoder_hidden_states": torch.randn(n, 5, 16, generator=g),
            "pooled_projections": torch.randn(n, 16, generator=g), "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(5, 3)}  # fmt: skip


def flux_forward(model, batch, noisy, timesteps):
    """The default forward_fn: Flux gets timesteps / 1000 (checked in test_flux_timestep_scale)."""
    return st.denoiser_output(model, batch, noisy, timesteps)


@torch.no_grad()
def test_flux_timestep_scale():
    model = tiny_flux().eval()
    batch = flux_batch()
    latents = batch["latents"]
    t = torch.tensor([7, 640])[: latents.shape[0]]
    kwargs = {k: v for k, v in batch.items() if k != "latents"}
    expected = model(latents, timestep=t.float() / 1000, **kwargs).sample
    torch.testing.assert_close(st.denoiser_output(model, batch, latents, t), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, model(latents, timestep=t.float(), **kwargs).sample)


@torch.no_grad()
def output(model, batch):
    latents = batch["latents"]
    return flux_forward(model, batch, latents, torch.linspace(7, 640, latents.shape[0]).long())


# ---- targets and what the gates compute ----


def test_single_stream_targets_and_layouts():
    model = tiny_flux()
    targets, skipped = st.find_structural_targets(model)
    expected = {"transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"}
    expected |= {f"{b}.{p}" for b in SINGLE for p in ("attn", "proj_mlp")}
    assert set(targets) == expected and not skipped
    block = model.single_transformer_blocks[0]
    attn, mlp = targets[f"{SINGLE[0]}.attn"], targets[f"{SINGLE[0]}.proj_mlp"]
    assert (attn.kind, attn.units, attn.group, attn.out_offset) == ("heads", HEADS, HEAD_DIM, 0)
    assert attn.in_layers == [block.attn.to_q, block.attn.to_k, block.attn.to_v] and attn.out_layers == [block.proj_out]
    assert (mlp.kind, mlp.units, mlp.group, mlp.out_offset) == ("ffn", MLP, 1, HEADS * HEAD_DIM)
    assert mlp.in_layers == [block.proj_mlp] and mlp.out_layers == [block.proj_out]
    # Removing a head saves 3 q/k/v rows of (16 weights + bias) and 16 proj_out entries per head feature.
    assert attn.params_per_unit == HEAD_DIM * (3 * (DIM + 1) + DIM)
    assert mlp.params_per_unit == (DIM + 1) + DIM
    # Double-stream blocks gate the context projections with the same heads.
    joint = targets["transformer_blocks.0.attn"]
    double = model.transformer_blocks[0].attn
    assert {double.add_q_proj, double.add_k_proj, double.add_v_proj} <= set(joint.in_layers)
    assert joint.out_layers == [double.to_out[0], double.to_add_out]
    only_single, _ = st.find_structural_targets(model, include=r"^single_.*proj_mlp$")
    assert set(only_single) == {f"{b}.proj_mlp" for b in SINGLE}


def test_single_stream_gates_scale_the_right_columns_of_proj_out():
    model = tiny_flux()
    batch = flux_batch()
    reference = copy.deepcopy(model)
    learner = StructuralGateLearner(model, include=r"^single_transformer_blocks\.0\.")
    gates = {name: torch.ones(p.shape) for name, p in learner.logits.items()}
    gates[f"{SINGLE[0]}.attn"] = torch.tensor([0.0, 0.5])
    gates[f"{SINGLE[0]}.proj_mlp"][::3] = 0.0
    learner.use_gates(gates)
    gated = output(model, batch)
    # The same by hand: proj_out's columns of head 0 zeroed, head 1 halved, every third MLP unit zeroed.
    with torch.no_grad():
        weight = reference.single_transformer_blocks[0].proj_out.weight
        weight[:, :HEAD_DIM] = 0
        weight[:, HEAD_DIM : 2 * HEAD_DIM] *= 0.5
        weight[:, 2 * HEAD_DIM :: 3] = 0
    torch.testing.assert_close(gated, output(reference, batch), rtol=1e-5, atol=1e-6)
    learner.use_gates(None)
    assert not torch.allclose(gated, output(model, batch), atol=1e-4)


def test_flux_gates_learn():
    model = tiny_flux()
    learner = StructuralGateLearner(model, forward_fn=flux_forward, sparsity_weight=0.5, lr=0.2, seed=1)
    first = learner.step(flux_batch(n=4))
    grads = {name: p.grad.clone() for name, p in learner.logits.items()}
    for name in (f"{b}.{p}" for b in SINGLE for p in ("attn", "proj_mlp")):
        assert grads[name].abs().sum() > 0, name
    for step in range(1, 40):
        info = learner.step(flux_batch(n=4, seed=step % 3))
    assert info["sparsity"] < first["sparsity"] and info["kept"] < first["kept"]


# ---- removal ----

CASES = {
    "partial": [],
    "single_attention_emptied": [f"{SINGLE[0]}.attn"],
    "single_mlp_emptied": [f"{SINGLE[1]}.proj_mlp"],
    "single_block_emptied": [f"{SINGLE[0]}.attn", f"{SINGLE[0]}.proj_mlp"],
    "double_attention_emptied": ["transformer_blocks.0.attn", f"{SINGLE[1]}.attn"],
}


def _gates(learner, empty, seed=0):
    """Eval-style gates: the named parts fully closed, elsewhere ~30% closed and ~20% at 0.7."""
    g = torch.Generator().manual_seed(seed)
    gates = {}
    for name, param in learner.logits.items():
        r = torch.rand(param.shape, generator=g)
        gate = torch.where(r < 0.3, 0.0, torch.where(r < 0.5, 0.7, 1.0))
        gate[0] = 1.0
        gates[name] = torch.zeros(param.shape) if name in empty else gate
    return gates


@pytest.mark.parametrize("hard", [False, True], ids=["gate_values", "bool_masks"])
@pytest.mark.parametrize("case", list(CASES))
def test_flux_removal_computes_what_the_gated_model_did(case, hard):
    model = tiny_flux()
    batch = flux_batch()
    learner = StructuralGateLearner(model)
    gates = _gates(learner, CASES[case])
    masks = {n: g > 0 for n, g in gates.items()} if hard else gates
    learner.use_gates(masks)
    gated = output(model, batch)
    learner.remove()
    assert not torch.allclose(gated, output(model, batch), atol=1e-4)
    params = sum(p.numel() for p in model.parameters())
    report = st.apply_structural_masks(model, masks)
    torch.testing.assert_close(output(model, batch), gated, rtol=1e-5, atol=1e-5)
    assert report.params_before == params and report.params_after < params
    assert sorted(report.emptied) == sorted(CASES[case])

    kept = {n: int((g > 0).sum()) for n, g in gates.items()}
    for block_name in SINGLE:
        block = model.get_submodule(block_name)
        heads, units = kept[f"{block_name}.attn"], kept[f"{block_name}.proj_mlp"]
        assert block.proj_mlp.out_features == units
        assert block.proj_out.in_features == heads * HEAD_DIM + units
        if heads:
            assert block.attn.heads == heads and block.attn.inner_dim == heads * HEAD_DIM
            assert block.attn.to_q.out_features == block.attn.to_v.out_features == heads * HEAD_DIM
            assert block.attn.norm_q.weight.shape == (HEAD_DIM,)  # per head_dim: stays
        else:
            assert isinstance(block.attn, st.PrunedAttention)
    double = model.transformer_blocks[0].attn
    heads = kept["transformer_blocks.0.attn"]
    if heads:
        for layer in (double.add_q_proj, double.add_k_proj, double.add_v_proj):
            assert layer.out_features == heads * HEAD_DIM
        assert double.to_add_out.in_features == double.to_out[0].in_features == heads * HEAD_DIM
    else:
        assert isinstance(double, st.PrunedAttention)
    assert report.heads_after == sum(kept[n] for n in learner.targets if learner.targets[n].kind == "heads")
    assert report.ffn_units_after == sum(kept[n] for n in learner.targets if learner.targets[n].kind == "ffn")


def test_pruned_flux_saves_and_loads_in_a_fresh_process(tmp_path):
    model = tiny_flux()
    learner = StructuralGateLearner(model, norms=r"single_transformer_blocks\.1\.attn\.norm_q$|\.norm2$")
    assert {"transformer_blocks.0.norm2", f"{SINGLE[1]}.attn.norm_q"} <= set(learner.targets)
    gates = _gates(learner, CASES["single_block_emptied"] + [f"{SINGLE[1]}.proj_mlp"], seed=2)
    learner.use_gates(gates)
    gated = output(model, flux_batch())
    learner.remove()
    report = st.apply_structural_masks(model, gates)
    out = output(model, flux_batch())
    torch.testing.assert_close(out, gated, rtol=1e-5, atol=1e-5)
    # Flux's norm2 is modulated and norm_q is per head_dim: their gates are only masks, folded in.
    assert sorted(report.masked_norms) == sorted(["transformer_blocks.0.norm2", f"{SINGLE[1]}.attn.norm_q"])
    assert model.single_transformer_blocks[1].proj_mlp.weight.shape == (0, DIM)
    prunedm.save_pretrained(model, tmp_path / "flux")
    save_file({**flux_batch(), "out": out}, str(tmp_path / "flux.safetensors"))
    script = textwrap.dedent(f"""
        import torch, prunedm
        torch.set_num_threads(1)
        from prunedm import structural as st
        model = prunedm.load_pretrained({str(tmp_path / "flux")!r})
        from safetensors.torch import load_file
        # clone: fresh, aligned buffers, as the parent process had (alignment can change SIMD rounding)
        batch = {{k: v.clone() for k, v in load_file({str(tmp_path / "flux.safetensors")!r}).items()}}
        expected = batch.pop("out")
        with torch.no_grad():
            out = st.denoiser_output(model, batch, batch["latents"], torch.tensor([7, 640]))
        assert torch.equal(out, expected), (out - expected).abs().max()
        blocks = model.single_transformer_blocks
        assert type(blocks[0].attn).__name__ == "PrunedAttention" and blocks[0].proj_out.in_features == 0
        assert blocks[1].proj_mlp.out_features == 0 and blocks[1].attn.heads == blocks[1].attn.to_q.out_features // 8
        assert model.transformer_blocks[0].norm2.weight is not None
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
