"""sparsify() on tiny diffusers models: outputs equal the masked dense model's, the report, masks, verify,
and describe/restore through safetensors into a freshly built model in a new process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from conftest import assert_close
from tiny_models import MODELS, build, inputs, run

import prunedm
from prunedm import ops
from prunedm.nn import (
    SparseConv2d,
    SparseLinear,
    describe_sparse_module,
    describe_sparse_modules,
    rebuild_sparse_module,
    restore_sparse_modules,
    sparse_modules,
    sparsify,
)

diffusers = pytest.importorskip("diffusers")


def magnitude_mask(weight):
    """Magnitude 2:4 of a Linear weight along in_features, or of a conv weight along Cin, in plain torch."""
    if weight.dim() == 2:
        return ops.nm_mask(weight, backend="reference")
    keep = ops.nm_mask(weight.permute(0, 2, 3, 1).contiguous(), backend="reference")
    return keep.permute(0, 3, 1, 2)


def masked_dense(model, report):
    """`model` with each converted layer's weight masked: the reference a sparsified model must equal."""
    for layer in report.converted:
        module = model.get_submodule(layer.name)
        with torch.no_grad():
            module.weight.copy_(torch.where(magnitude_mask(module.weight), module.weight, 0))
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_sparsified_model_equals_masked_dense(name):
    model = build(name)
    reference = copy.deepcopy(model)
    report = sparsify(model)
    assert len(report.converted) >= 10
    converted = {c.name for c in report.converted}
    assert set(sparse_modules(model)) == converted
    assert all(isinstance(model.get_submodule(s.name), (nn.Linear, nn.Conv2d)) for s in report.skipped)
    kwargs = inputs(name)
    assert_close(run(model, kwargs), run(masked_dense(reference, report), kwargs))
    # After a forward the report says where each layer ran; on CPU that is the dense path.
    runtime = report.runtime()
    assert all(run is not None for run in runtime.values())
    assert report.sparse_kernel_layers == [] and len(report.dense_fallback_layers) == len(report.converted)
    assert report.bytes_after < 0.6 * report.bytes_before
    assert report.model_bytes_after < report.model_bytes_before
    text = str(report)
    assert "converted:" in text and "last forward" in text


@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "UNet2DConditionModel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_models(name, dtype):
    model = build(name, dtype)
    reference = copy.deepcopy(model)
    report = sparsify(model)
    kwargs = inputs(name, dtype)
    assert_close(run(model, kwargs), run(masked_dense(reference, report), kwargs))
    aligned = [
        c for c in report.converted if c.padded_shape == (c.weight_shape[0], c.dense_bytes // c.weight_shape[0] // 2)
    ]
    assert aligned and all(c.packed_bytes * 16 == c.dense_bytes * 9 for c in aligned)


def test_autocast_bf16_model():
    model = build("UNet2DConditionModel")
    reference = copy.deepcopy(model)
    report = sparsify(model)
    masked_dense(reference, report)
    kwargs = inputs("UNet2DConditionModel")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = run(model, kwargs), run(reference, kwargs)
    assert_close(got.float(), expected.float())


def test_skip_reasons_in_report():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(
        nn.Conv2d(3, 32, 3),  # Cin not a multiple of 4
        nn.Conv2d(32, 32, 3, groups=4),  # grouped
        nn.Conv2d(32, 4, 3),  # 4 rows padded to 32: no saving
        nn.Linear(64, 64, dtype=torch.complex64),  # dtype
        Custom(64, 64),  # overrides forward
        nn.Linear(64, 64),  # converted
        nn.Linear(64, 32),  # filtered out
    )
    report = sparsify(model, filter_fn=lambda module, name: name != "6")
    reasons = {s.name: s.reason for s in report.skipped}
    assert [c.name for c in report.converted] == ["5"]
    assert "in_channels=3" in reasons["0"] and "groups=4" in reasons["1"] and "saves no memory" in reasons["2"]
    assert "dtype" in reasons["3"] and "overrides" in reasons["4"] and "filter" in reasons["6"]
    assert isinstance(model[5], SparseLinear) and type(model[6]) is nn.Linear
    assert "skipped:" in str(report) and "not run yet" in str(report)


def test_padded_layers_are_converted_when_they_save_memory():
    model = nn.Sequential(nn.Linear(320, 100), nn.Linear(100, 64))  # 100 rows -> 128; 100 cols -> 128
    reference = copy.deepcopy(model)
    report = sparsify(model)
    assert [c.padded_shape for c in report.converted] == [(128, 320), (64, 128)]
    masked_dense(reference, report)
    x = torch.randn(3, 320)
    assert_close(model(x), reference(x))


def test_a_bare_layer_is_not_swapped_in_place():
    linear = nn.Linear(64, 64)
    report = sparsify(linear)
    assert not report.converted and "from_dense" in report.skipped[0].reason


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sparsify(model)
    assert model[0] is model[2] and isinstance(model[0], SparseLinear)


def test_masks_convert_only_named_layers():
    model = build("UNet2DConditionModel")
    reference = copy.deepcopy(model)
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1",
             "mid_block.resnets.0.conv2"]  # fmt: skip
    g = torch.Generator().manual_seed(5)
    masks = {}
    for name in names:
        weight = model.get_submodule(name).weight
        matrix = weight if weight.dim() == 2 else weight.permute(0, 2, 3, 1)
        ranks = torch.rand(*matrix.shape[:-1], matrix.shape[-1] // 4, 4, generator=g).argsort(-1)
        keep = (ranks < 2).reshape(matrix.shape)  # random 2:4, unlike magnitude
        masks[name] = keep if weight.dim() == 2 else keep.permute(0, 3, 1, 2)
    report = sparsify(model, masks=masks)
    assert sorted(c.name for c in report.converted) == sorted(names)
    assert all(s.reason.startswith("no mask given") for s in report.skipped)
    for name in names:
        module = reference.get_submodule(name)
        with torch.no_grad():
            module.weight.copy_(torch.where(masks[name], module.weight, 0))
    kwargs = inputs("UNet2DConditionModel")
    assert_close(run(model, kwargs), run(reference, kwargs))


def test_bad_masks_name_the_module_and_leave_the_model_untouched():
    model = build("DiTTransformer2DModel")
    good = {"transformer_blocks.0.attn1.to_q": torch.zeros(32, 32, dtype=torch.bool)}
    bad = {**good, "transformer_blocks.0.attn1.to_k": torch.ones(32, 32, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"masks\['transformer_blocks.0.attn1.to_k'\].*not 2:4"):
        sparsify(model, masks=bad)
    assert sparse_modules(model) == {}
    with pytest.raises(ValueError, match="not_a_layer"):
        sparsify(model, masks={"not_a_layer": torch.zeros(4, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="pattern"):
        sparsify(model, pattern="1:4")
    with pytest.raises(ValueError, match="backend"):
        sparsify(model, backend="fastest")


def test_verify_accepts_good_layers_and_refuses_bad_ones(monkeypatch):
    model = build("UNet2DModel")
    report = sparsify(copy.deepcopy(model), verify=True)
    assert report.converted and not any("verify" in s.reason for s in report.skipped)
    assert all(run is None for run in report.runtime().values())  # verify's own forward is not reported

    original = SparseLinear._forward_dense

    def broken(self, x):  # a layer whose kernel is wrong
        out = original(self, x)
        return out + 1 if self.out_features == 64 else out

    monkeypatch.setattr(SparseLinear, "_forward_dense", broken)
    report = sparsify(model, verify=True)
    refused = [s for s in report.skipped if s.reason.startswith("verify failed")]
    assert refused and all(type(model.get_submodule(s.name)) is nn.Linear for s in refused)
    assert all(model.get_submodule(s.name).out_features == 64 for s in refused)
    assert any(c.kind == "Linear" for c in report.converted)


def test_torch_compile_of_sparsified_model():
    model = build("DiTTransformer2DModel")
    sparsify(model)
    kwargs = inputs("DiTTransformer2DModel")
    expected = run(model, kwargs)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break on the dense path
    assert torch.equal(run(compiled, kwargs), expected)


def test_describe_restore_in_process():
    model = build("UNet2DConditionModel", torch.bfloat16)
    sparsify(model)
    description = json.loads(json.dumps(describe_sparse_modules(model)))
    fresh = build("UNet2DConditionModel", torch.bfloat16, seed=1)
    restored = restore_sparse_modules(fresh, description)
    assert set(restored) == set(sparse_modules(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    kwargs = inputs("UNet2DConditionModel", torch.bfloat16)
    assert torch.equal(run(fresh, kwargs), run(model, kwargs))
    assert restore_sparse_modules(fresh, description).keys() == restored.keys()  # idempotent


def test_restore_refuses_a_mismatched_model():
    model = build("DiTTransformer2DModel")
    sparsify(model)
    description = describe_sparse_modules(model)
    other = nn.Module()
    with pytest.raises(ValueError, match="no module"):
        restore_sparse_modules(other, description)
    fresh = build("DiTTransformer2DModel")
    name = "transformer_blocks.0.attn1.to_q"
    description["modules"][name]["out_features"] = 64
    with pytest.raises(ValueError, match="does not match"):
        restore_sparse_modules(fresh, description)
    with pytest.raises(ValueError, match="format"):
        restore_sparse_modules(fresh, {"format": "something else"})


def test_structure_hooks_rebuild_on_the_meta_device():
    """The per-module pair a save/load module registers: describe each layer, rebuild it on a meta model."""
    model = build("DiTTransformer2DModel", torch.bfloat16)
    sparsify(model)
    described = {name: describe_sparse_module(m) for name, m in sparse_modules(model).items()}
    with torch.device("meta"):
        fresh = build("DiTTransformer2DModel", torch.bfloat16)
    for name, config in described.items():
        current = fresh.get_submodule(name)
        assert current.weight.is_meta
        parent, _, child = name.rpartition(".")
        setattr(fresh.get_submodule(parent), child, rebuild_sparse_module(json.loads(json.dumps(config)), current))
    state = model.state_dict()
    fresh.load_state_dict(state, strict=True, assign=True)
    for name, buffer in model.named_buffers():  # DiT's non-persistent positional table (not a sparse layer's)
        if name not in state:
            owner, _, attr = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[attr] = buffer
    assert not any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()])
    kwargs = inputs("DiTTransformer2DModel", torch.bfloat16)
    assert torch.equal(run(fresh, kwargs), run(model, kwargs))


_LOADER = textwrap.dedent(
    """
    import json, sys
    import diffusers, torch
    from safetensors.torch import load_file
    from prunedm.nn import restore_sparse_modules, sparse_modules

    folder = sys.argv[1]
    meta = json.load(open(f"{folder}/model.json"))
    torch.manual_seed(123)  # other random weights than the saved model's
    model = getattr(diffusers, meta["class"])(**meta["config"]).to(getattr(torch, meta["dtype"])).eval()
    restore_sparse_modules(model, meta["sparse"])
    model.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=True)
    kwargs = load_file(f"{folder}/inputs.safetensors")
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    expected = load_file(f"{folder}/output.safetensors")["output"]
    print("equal" if torch.equal(out, expected) else f"differ by {(out - expected).abs().max()}")
    print("sparse layers", len(sparse_modules(model)))
    """
)


def test_save_and_load_in_a_new_process(tmp_path):
    from safetensors.torch import save_file

    name = "UNet2DConditionModel"
    model = build(name, torch.bfloat16)
    report = sparsify(model)
    kwargs = inputs(name, torch.bfloat16)
    output = run(model, kwargs)
    state = model.state_dict()
    assert not any(key.endswith(f"{c.name}.weight") for c in report.converted for key in state)
    save_file(state, tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in kwargs.items()}, tmp_path / "inputs.safetensors")
    save_file({"output": output.contiguous()}, tmp_path / "output.safetensors")
    cls_name, config, _ = MODELS[name]
    meta = {"class": cls_name, "config": config, "dtype": "bfloat16", "sparse": describe_sparse_modules(model)}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        prunedm.__file__)), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "equal" in result.stdout.splitlines()[0], result.stdout
    assert f"sparse layers {len(report.converted)}" in result.stdout


@pytest.mark.cuda
@pytest.mark.sm80
@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "UNet2DConditionModel", "FluxTransformer2DModel"])
def test_cuda_sparsified_model_runs_sparse_kernels(name):
    model = build(name, torch.float16).cuda()
    reference = copy.deepcopy(model)
    report = sparsify(model, verify=True)
    kwargs = {k: v.cuda() for k, v in inputs(name, torch.float16).items()}
    got = run(model, kwargs)
    expected = run(masked_dense(reference, report), kwargs)
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * scale)
    # Every linear ran the sparse kernel; convs run dense until prunedm's sparse conv lands.
    assert report.sparse_kernel_layers, str(report)
    assert all(isinstance(model.get_submodule(layer), SparseConv2d) for layer in report.dense_fallback_layers), str(
        report
    )
