"""The NVRTC path on a real GPU (needs cupy and an sm80+ GPU): the kernels compiled at first use through cupy
against the reference, for linear and conv, both 16-bit dtypes and the fused epilogue, and the disk cache
reused by a second process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close, random_2to4

import prunedm
from prunedm.ops import _nvrtc, reference, sparse_conv2d_2to4, sparse_linear_2to4

pytestmark = [pytest.mark.cuda, pytest.mark.sm80]
cupy = pytest.importorskip("cupy", reason="the NVRTC path needs cupy (pip install prunedm[cupy])")

DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path))
    _nvrtc.clear_loaded()
    yield tmp_path
    _nvrtc.clear_loaded()


def randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", [False, True])
def test_linear_matches_reference(dtype, epilogue):
    values, meta = prunedm.ops.compress_2to4(random_2to4(96, 160, dtype).cuda())
    x = randn(3, 37, 160, dtype=dtype)
    bias = randn(96, dtype=dtype, seed=2) if epilogue else None
    residual = randn(37, 96, dtype=dtype, seed=3) if epilogue else None
    activation = "gelu_tanh" if epilogue else "none"
    with torch.no_grad():
        out = sparse_linear_2to4(x, values, meta, bias, activation=activation, residual=residual, backend="nvrtc")
        expected = reference.sparse_linear_2to4_ref(x, values, meta, bias, activation, residual)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_matches_reference(dtype, channels_last):
    cout, cin, kh, kw = 64, 32, 3, 3  # K = 288, a multiple of 32
    values, meta = prunedm.ops.compress_2to4(random_2to4(cout, kh * kw * cin, dtype).cuda())
    x = randn(2, cin, 13, 10, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias, shape = randn(cout, dtype=dtype, seed=4), (cout, cin, kh, kw)
    with torch.no_grad():
        out = sparse_conv2d_2to4(x, values, meta, shape, bias, stride=2, padding=1, activation="silu", backend="nvrtc")
        expected = reference.sparse_conv2d_2to4_ref(x, values, meta, shape, bias, (2, 2), (1, 1), (1, 1), "silu", None)
    assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_kernels_run_on_torchs_current_stream_and_cache_is_reused(private_cache):
    values, meta = prunedm.ops.compress_2to4(random_2to4(64, 64, torch.float16).cuda())
    x = randn(8, 64, dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(stream):
        out = sparse_linear_2to4(x, values, meta, backend="nvrtc")
    stream.synchronize()
    assert_close(out, reference.sparse_linear_2to4_ref(x, values, meta, None, "none", None))
    manifests = list((private_cache / "nvrtc").glob("*/manifest.json"))
    assert len(manifests) == 1
    before = manifests[0].stat().st_mtime_ns
    script = (
        "import torch, prunedm\n"
        "from prunedm.ops import _nvrtc\n"
        "major, minor = torch.cuda.get_device_capability()\n"
        "k = _nvrtc.load_kernels(0, 10 * major + minor)\n"
        "print(len(k))\n"
    )
    env = {**os.environ, "PRUNEDM_CACHE_DIR": str(private_cache)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "4"
    assert manifests[0].stat().st_mtime_ns == before  # read, not rewritten
