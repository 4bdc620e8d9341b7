"""No host sync in a sparse layer's forward: on every path reachable on CPU, SparseLinear / SparseConv2d read no
tensor back to the host (.item(), int(), bool(), float(), tolist()); metadata is checked once, at load time."""

from __future__ import annotations

import sys
import traceback

import pytest
import torch
import torch.nn as nn

from prunedm import _ext, ops
from prunedm.nn import SparseConv2d, SparseLinear, _backends
from prunedm.nn import _packing as packing
from prunedm.ops import _backends as op_table
from prunedm.ops import _nvrtc, reference, sparse24, sparse_mm

pytestmark = pytest.mark.usefixtures("one_thread_module")

_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


class HostReads:
    """Counts calls of the tensor methods that read a value back to the host, with where they came from."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self._monkeypatch = monkeypatch
        self.active = False

    def __enter__(self):
        for name in _READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                if self.active:
                    caller = traceback.extract_stack(sys._getframe(1), limit=1)[0]
                    self.calls.append(f"{_name} at {caller.filename}:{caller.lineno}")
                return _original(tensor, *args, **kwargs)

            self._monkeypatch.setattr(torch.Tensor, name, counted)
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False  # monkeypatch puts the methods back when the test ends


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path))
    _backends._warned.clear()
    op_table.clear_cache()  # some tests fake what the backend table sees
    yield
    op_table.clear_cache()


def _linear(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return SparseLinear.from_dense(nn.Linear(64, 96).to(dtype), **kwargs)


def _conv(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return SparseConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1).to(dtype), **kwargs)


def _inputs(layer):
    g = torch.Generator().manual_seed(1)
    shape = (3, 64) if isinstance(layer, SparseLinear) else (2, 32, 6, 6)
    return torch.randn(shape, generator=g).to(layer.values.dtype)


def _forwards_read_nothing(layer, monkeypatch, expected_path: str, compare: bool = True) -> None:
    x = _inputs(layer)
    with HostReads(monkeypatch) as reads, torch.no_grad():
        first = layer(x)  # prepare() included
        second = layer(x)
    assert layer.last_run[0] == expected_path, layer.last_run
    assert reads.calls == [], reads.calls
    if compare:
        torch.testing.assert_close(first, second)


@pytest.mark.parametrize("make", [_linear, _conv])
def test_dense_path_with_cached_weight(make, monkeypatch):
    _forwards_read_nothing(make(backend="dense", cache_dense=True), monkeypatch, "dense")


@pytest.mark.parametrize("make", [_linear, _conv])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_path_decompressing_per_call_extension(make, dtype, monkeypatch):
    if not _ext.extension_loaded():
        pytest.skip("prunedm._C is not built")
    _forwards_read_nothing(make(dtype, backend="dense"), monkeypatch, "dense")


@pytest.mark.parametrize("make", [_linear, _conv])
def test_dense_path_decompressing_per_call_reference(make, monkeypatch):
    monkeypatch.setitem(packing._DECOMPRESS, "cpu", reference.decompress_2to4_ref)
    layer = make(backend="dense")
    _forwards_read_nothing(layer, monkeypatch, "dense")
    expected = make(backend="dense", cache_dense=True)(_inputs(layer))
    torch.testing.assert_close(layer(_inputs(layer)), expected)


@pytest.mark.parametrize("make", [_linear, _conv])
def test_dense_path_decompressing_per_call_triton_interpreter(make, monkeypatch):
    # What runs on a GPU without the CUDA extension: the Triton kernel, here through the interpreter.
    pytest.importorskip("prunedm.kernels", reason="prunedm.kernels is not installed (pip install -e .)")
    if not _triton_runs_on_cpu():
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    monkeypatch.setattr(
        packing, "_decompress16", lambda v, m: sparse24.decompress_2to4_unchecked(v, m, backend="triton")
    )
    layer = make(torch.float16, backend="dense")
    _forwards_read_nothing(layer, monkeypatch, "dense")


def _triton_runs_on_cpu() -> bool:
    return _ext.triton_usable_on(torch.device("cpu"))[0]


@pytest.mark.parametrize("make", [_linear, _conv])
def test_prunedm_path_extension_cpu(make, monkeypatch):
    if not _ext.extension_loaded():
        pytest.skip("prunedm._C is not built")
    layer = make(backend="prunedm")
    _forwards_read_nothing(layer, monkeypatch, "prunedm")
    assert layer._runtime.prunedm_kernel == "extension"


@pytest.mark.parametrize("make", [_linear, _conv])
def test_prunedm_path_reference(make, monkeypatch):
    monkeypatch.setattr(ops, "sparse_kernel_backend", lambda device, **kwargs: (None, "stubbed"))
    layer = make(backend="prunedm")
    _forwards_read_nothing(layer, monkeypatch, "prunedm")
    assert layer._runtime.prunedm_kernel == "reference"


@pytest.mark.parametrize("make", [_linear, _conv])
def test_prunedm_path_gpu_glue_with_the_kernel_stubbed(make, monkeypatch):
    # The CUDA path's Python side (argument checks, dispatch, launch parameters), the kernel launch stubbed.
    launches = []
    monkeypatch.setattr(ops, "sparse_kernel_backend", lambda device, **kwargs: ("nvrtc", ""))
    monkeypatch.setattr(sparse_mm, "_nvrtc_problem", lambda device: "")
    monkeypatch.setattr(_nvrtc, "_check_cuda", lambda op, input: 80)
    monkeypatch.setattr(_nvrtc, "_launch", lambda op, input, conv, params, m, p, arch: launches.append((op, m, p)))
    layer = make(torch.float16, backend="prunedm")
    _forwards_read_nothing(layer, monkeypatch, "prunedm", compare=False)  # the stub writes no output
    assert layer._runtime.prunedm_kernel == "nvrtc" and len(launches) == 2


def test_the_counter_sees_host_reads(monkeypatch):
    t = torch.ones(3)
    with HostReads(monkeypatch) as reads:
        int(t.sum()), float(t[0]), bool(t.any()), t.sum().item(), t.tolist()
    assert [c.split(" at ")[0] for c in reads.calls] == ["__int__", "__float__", "__bool__", "item", "tolist"]


def test_invalid_metadata_is_refused_at_load_not_per_call():
    layer = _linear(backend="dense")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["meta"][3, 1] = 0x4440  # one entry names index 0 twice
    fresh_layer = SparseLinear(64, 96, backend="dense")
    with pytest.raises(RuntimeError, match=r"meta: meta holds 1 invalid 2:4 index pair"):
        fresh_layer.load_state_dict(state)
    assert packing.meta_problem(layer.meta) is None


def test_unchecked_decompress_decodes_like_the_reference():
    from conftest import random_2to4

    values, meta = ops.compress_2to4(random_2to4(64, 64, torch.float16))
    for backend in ("reference", "extension") if _ext.extension_loaded() else ("reference",):
        got = sparse24.decompress_2to4_unchecked(values, meta, backend=backend)
        assert torch.equal(got, ops.decompress_2to4(values, meta, backend="reference"))
    assert sparse24.invalid_meta_count(meta) == 0
    bad = meta.clone()
    bad[0, 0] = 0
    assert sparse24.invalid_meta_count(bad) == 4
    with pytest.raises(ValueError, match="meta holds 4 invalid"):
        ops.decompress_2to4(values, bad, backend="reference")


def test_a_cuda_build_registers_the_unchecked_decompress_with_its_fake():
    if not _ext.cuda_kernels_built():
        pytest.skip("prunedm._C was built without CUDA")
    op = sparse24._unchecked_extension_op()
    assert op is not None and packing._DECOMPRESS["cuda"] is sparse24._decompress_extension_unchecked
    values = torch.empty(64, 32, dtype=torch.float16, device="meta")
    meta = torch.empty(64, 4, dtype=torch.int16, device="meta")
    out = op(values, meta)  # the fake registered by prunedm.ops.sparse24, as torch.compile traces it
    assert out.shape == (64, 64) and out.dtype == torch.float16 and out.device.type == "meta"
