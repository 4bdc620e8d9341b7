"""backend="prunedm": SparseLinear / SparseConv2d call prunedm.ops' sparse kernels (on CPU their C++ twin)
and match the masked dense layer; shapes the kernel cannot take fall back with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from prunedm.nn import SparseConv2d, SparseFallbackWarning, SparseLinear, _backends, sparsify

TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path))
    _backends._warned.clear()


def _x(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", [(64, 96), (36, 40), (320, 100)])
def test_linear_prunedm_matches_dense(shape, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(*shape).to(dtype)
    sparse = SparseLinear.from_dense(linear, backend="prunedm")
    x = _x((2, 3, shape[0]), dtype)
    got = sparse(x)
    assert sparse.last_run == ("prunedm", "prunedm 2:4 kernel")
    expected = sparse.to_dense()(x)
    assert got.shape == expected.shape and got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol * max(1.0, float(expected.abs().max())))


CONVS = [
    dict(in_channels=32, out_channels=64, kernel_size=3, padding=1),
    dict(in_channels=32, out_channels=40, kernel_size=1, bias=False),  # padded Cout, sliced off
    dict(in_channels=32, out_channels=32, kernel_size=3, stride=2, padding=1, dilation=2),
    dict(in_channels=32, out_channels=32, kernel_size=3, padding="same"),
    dict(in_channels=32, out_channels=32, kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("case", CONVS)
def test_conv_prunedm_matches_dense(case):
    torch.manual_seed(0)
    conv = nn.Conv2d(**case)
    sparse = SparseConv2d.from_dense(conv, backend="prunedm")
    x = _x((2, case["in_channels"], 9, 9), torch.float32)
    got = sparse(x)
    assert sparse.last_run[0] == "prunedm", sparse.last_run
    expected = sparse.to_dense()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max())))
    unbatched = sparse(x[0])
    torch.testing.assert_close(unbatched, expected[0], rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max())))


def test_conv_with_padded_k_falls_back_with_reason():
    conv = nn.Conv2d(8, 32, 3, padding=1)  # K = 72: packed padded to 96
    sparse = SparseConv2d.from_dense(conv, backend="prunedm")
    x = _x((1, 8, 6, 6), torch.float32)
    with pytest.warns(SparseFallbackWarning, match="multiples of 32"):
        got = sparse(x)
    assert sparse.last_run[0] == "dense" and torch.equal(got, sparse.to_dense()(x))


def test_cpu_auto_never_picks_prunedm_and_sparsify_takes_the_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 64))
    x = _x((2, 32, 4, 4), torch.float32)
    expected = model(x)
    report = sparsify(model, backend="prunedm")
    got = model(x)
    assert sorted(report.sparse_kernel_layers) == ["0", "3"]
    assert got.shape == expected.shape
    auto = SparseLinear.from_dense(nn.Linear(64, 32))
    auto(_x((2, 64), torch.float32))
    assert auto.last_run[0] == "dense" and auto._runtime.paths == []


@pytest.mark.cuda
@pytest.mark.sm80
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_cuda_prunedm_linear_and_conv(dtype):
    torch.manual_seed(0)
    for module, x in (
        (nn.Linear(1152, 4608), _x((3, 1152), dtype)),
        (nn.Conv2d(64, 128, 3, padding=1), _x((2, 64, 16, 16), dtype)),
    ):
        sparse = (SparseLinear if isinstance(module, nn.Linear) else SparseConv2d).from_dense(
            module.to(dtype).cuda(), backend="prunedm"
        )
        got = sparse(x.cuda())
        assert sparse.last_run[0] == "prunedm", sparse.last_run
        expected = sparse.to_dense()(x.cuda())
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * max(1.0, float(expected.abs().max())))
