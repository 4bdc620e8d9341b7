"""The sm_90 truth of backend="auto" (prunedm's Ampere-class mma.sp kernels are no candidate there unless asked
for) and 1x1 convs through torch.sparse's 2:4 GEMM over NHWC pixels; on CPU with a faked GPU (capability, name,
prunedm's kernels) and torch's sparse weight faked by the padded dense matrix (test_autotune's stand-in)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_autotune import FakeTimer, _dense_as_sparse, cache_dir  # noqa: F401 (a fixture)

from prunedm.nn import SparseConv2d, SparseFallbackWarning, SparseLinear, _autotune, _backends, _runtime

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(cache_dir, monkeypatch):  # noqa: F811 (the imported fixture, requested)
    """A CUDA device of settable capability on which torch's and prunedm's sparse kernels are usable."""
    gpu = types.SimpleNamespace(capability=(9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(_backends, "torch_backend_problem", lambda device, dtype: None)
    monkeypatch.setattr(_backends, "build_semi_structured", _dense_as_sparse)
    monkeypatch.setattr(_backends, "prunedm_backend_problem", lambda device, dtype, conv_in_channels=None: None)
    kernel = types.SimpleNamespace(fn=lambda *args: None)
    monkeypatch.setattr(_runtime, "op_table", types.SimpleNamespace(resolve=lambda op, backend, device, dtype: kernel))
    monkeypatch.setattr(_runtime, "ops", types.SimpleNamespace(sparse_kernel_backend=lambda device: ("extension", "")))
    return gpu


def _prepared(layer, backend):
    layer.backend = backend
    layer._reset_runtime()
    layer._runtime.prepare(layer, CUDA, torch.float16)
    return layer._runtime


def _linear():
    torch.manual_seed(0)
    return SparseLinear.from_dense(nn.Linear(64, 96))


def _conv(kernel_size=1, stride=1, padding=0, cin=64, cout=96):
    torch.manual_seed(0)
    return SparseConv2d.from_dense(nn.Conv2d(cin, cout, kernel_size, stride, padding))


def test_auto_on_sm90_offers_no_mma_sp_kernel_unless_asked(fake_gpu):
    fake_gpu.capability = (8, 0)
    assert _prepared(_linear(), "auto").paths == ["torch", "prunedm"]
    assert _prepared(_conv(3, padding=1), "auto").paths == ["prunedm"]
    fake_gpu.capability = (9, 0)
    linear = _prepared(_linear(), "auto")
    assert linear.paths == ["torch"] and "sm_90" in linear.auto_note and "Ampere-class" in linear.auto_note
    conv = _prepared(_conv(3, padding=1), "auto")  # dense: no torch conv kernel, mma.sp left out
    assert conv.paths == [] and "Ampere-class" in conv.dense_problem and "convs dense" in conv.dense_problem
    assert _prepared(_conv(1), "auto").paths == ["torch"]  # 1x1: cuSPARSELt's GEMM over NHWC pixels
    # Explicitly requested, they run.
    assert _prepared(_linear(), "prunedm").paths == ["prunedm"]
    assert _prepared(_conv(3, padding=1), "prunedm").paths == ["prunedm"]
    fake_gpu.capability = (10, 0)  # only 9.x is left out; other capabilities are timed as usual
    assert _prepared(_linear(), "auto").paths == ["torch", "prunedm"]


def test_auto_reason_on_sm90_says_why(fake_gpu, monkeypatch):
    timer = FakeTimer({"dense": 1.0, "torch": 0.5})
    monkeypatch.setattr(_autotune, "TIMER", timer)
    layer = _linear().half()  # stays on CPU: the faked prepare only says which paths it may take
    _prepared(layer, "auto")
    path, why = layer._runtime.choose_path(layer, torch.randn(4, 64, dtype=torch.float16))
    assert path == "torch" and set(timer.calls) == {"dense", "torch"}
    assert why.startswith("auto picked torch") and "prunedm's mma.sp kernels are Ampere-class" in why


@pytest.mark.parametrize(
    "cin, cout, bias, channels_last, unbatched",
    [(64, 96, True, False, False), (36, 40, True, True, False), (64, 32, False, False, True)],
    ids=["plain", "padded-k-and-rows-channels-last", "unbatched-no-bias"],
)
def test_pointwise_conv_as_nhwc_gemm_matches_conv2d(fake_gpu, cin, cout, bias, channels_last, unbatched):
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, 1, bias=bias)
    layer = SparseConv2d.from_dense(dense, backend="torch")
    assert layer._supports_torch_kernel
    layer._runtime.prepare(layer)  # CPU: the faked torch kernel is the padded dense matrix
    assert layer._runtime.paths == ["torch"]
    x = torch.randn(2, cin, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if unbatched:
        x = x[0]
    y = layer(x)
    assert layer.last_run[0] == "torch"
    expected = F.conv2d(x, layer.to_dense().weight, layer.bias)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize(
    "kernel_size, stride, padding", [(3, 1, 1), (1, 2, 0), (1, 1, 1)], ids=["3x3", "strided", "padded"]
)
def test_other_convs_have_no_torch_kernel(fake_gpu, kernel_size, stride, padding):
    layer = _conv(kernel_size, stride, padding)
    layer.backend = "torch"
    assert not layer._supports_torch_kernel
    layer._runtime.prepare(layer)
    x = torch.randn(1, 64, 6, 6)
    with pytest.warns(SparseFallbackWarning, match="no 2:4 convolution kernel"):
        y = layer(x)
    torch.testing.assert_close(y, layer.to_dense()(x))
    assert layer.last_run[0] == "dense"


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="needs a CUDA GPU with Sparse Tensor Cores (compute capability >= 8.0)",
)
def test_pointwise_conv_through_torch_sparse_on_gpu():
    torch.manual_seed(0)
    dense = nn.Conv2d(128, 256, 1).half().cuda()
    layer = SparseConv2d.from_dense(dense, backend="torch")
    x = torch.randn(2, 128, 16, 16, device="cuda", dtype=torch.float16)
    y = layer(x)
    assert layer.last_run[0] == "torch", layer.last_run
    torch.testing.assert_close(y, F.conv2d(x, layer.to_dense().weight, layer.bias), rtol=2e-2, atol=2e-2)
