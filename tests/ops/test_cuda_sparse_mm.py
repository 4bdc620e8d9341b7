"""The mma.sp CUDA kernels of sparse_linear_2to4 and sparse_conv2d_2to4 against the reference (needs an sm80+ GPU):
odd shapes, both 16-bit dtypes, every epilogue, conv strides/paddings/dilations and memory formats, misaligned
inputs, fallbacks and errors, opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, random_2to4

import prunedm
from prunedm.ops import reference, sparse_conv2d_2to4, sparse_linear_2to4

pytestmark = [pytest.mark.cuda, pytest.mark.sm80]

DTYPES = (torch.float16, torch.bfloat16)


def _require_kernels():
    usable, reason = prunedm.ops.sparse_kernels_available("cuda")
    if not usable:
        pytest.skip(reason)


def packed(rows, cols, dtype, seed=0):
    dense = random_2to4(rows, cols, dtype, seed=seed).cuda()
    values, meta = prunedm.ops.compress_2to4(dense)
    return dense, values, meta


def randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, rows, cols",
    [
        ((1,), 32, 32),
        ((3,), 32, 64),
        ((2, 5), 96, 96),
        ((65,), 64, 160),
        ((7, 19), 128, 256),
        ((1000,), 320, 1024),
        ((0,), 32, 32),
    ],
)
def test_linear_matches_reference(dtype, batch, rows, cols):
    _require_kernels()
    dense, values, meta = packed(rows, cols, dtype)
    x = randn(*batch, cols, dtype=dtype)
    out = sparse_linear_2to4(x, values, meta, backend="extension")
    assert out.shape == (*batch, rows) and out.dtype == dtype and out.is_cuda
    assert_close(out, reference.sparse_linear_2to4_ref(x, values, meta))
    assert_close(out, (x.double() @ dense.double().T).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("residual_shape", [None, (33, 96), (96,), (33, 1)])
def test_linear_epilogue(dtype, activation, residual_shape):
    _require_kernels()
    _, values, meta = packed(96, 128, dtype, seed=2)
    x = randn(33, 128, dtype=dtype, seed=3)
    bias = randn(96, dtype=dtype, seed=4)
    residual = None if residual_shape is None else randn(*residual_shape, dtype=dtype, seed=5)
    out = sparse_linear_2to4(x, values, meta, bias, activation=activation, residual=residual, backend="extension")
    assert_close(out, reference.sparse_linear_2to4_ref(x, values, meta, bias, activation, residual))


def test_linear_agrees_with_the_cpu_twin():
    _require_kernels()
    _, values, meta = packed(64, 96, torch.float16, seed=6)
    x = randn(17, 96, dtype=torch.float16, seed=7)
    bias = randn(64, dtype=torch.float16, seed=8)
    gpu = sparse_linear_2to4(x, values, meta, bias, activation="silu", backend="extension")
    cpu = sparse_linear_2to4(x.cpu(), values.cpu(), meta.cpu(), bias.cpu(), activation="silu", backend="extension")
    assert_close(gpu.cpu(), cpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 17])
def test_split_k_for_small_p_matches_and_is_deterministic(dtype, tokens):
    # P <= 17 columns and one 128-feature tile: split_k::choose_splits splits K = 2080 (65 chunks, not a multiple
    # of splits x 32) across up to 16 CTAs on any GPU of 2+ SMs; the fused epilogue applies once, after the sum.
    _require_kernels()
    _, values, meta = packed(128, 2080, dtype, seed=20)
    x = randn(tokens, 2080, dtype=dtype, seed=21)
    bias, residual = randn(128, dtype=dtype, seed=22), randn(tokens, 128, dtype=dtype, seed=23)
    out = sparse_linear_2to4(x, values, meta, bias, activation="gelu", residual=residual, backend="extension")
    assert_close(out, reference.sparse_linear_2to4_ref(x, values, meta, bias, "gelu", residual))
    for _ in range(3):  # no atomics: the same input gives the same bits
        again = sparse_linear_2to4(x, values, meta, bias, activation="gelu", residual=residual, backend="extension")
        assert torch.equal(again, out)
    # The conv kernel splits the same way (a 4x4 feature map at batch 1: P = 16).
    mat, cvalues, cmeta = packed(128, 256 * 9, dtype, seed=24)
    xc, shape = randn(1, 256, 4, 4, dtype=dtype, seed=25), (128, 256, 3, 3)
    conv = sparse_conv2d_2to4(xc, cvalues, cmeta, shape, bias, padding=1, activation="silu", backend="extension")
    assert_close(conv, reference.sparse_conv2d_2to4_ref(xc, cvalues, cmeta, shape, bias, 1, 1, 1, "silu", None))
    assert torch.equal(sparse_conv2d_2to4(xc, cvalues, cmeta, shape, bias, padding=1, activation="silu",
                                          backend="extension"), conv)  # fmt: skip


def test_linear_misaligned_and_strided_inputs():
    _require_kernels()
    _, values, meta = packed(32, 64, torch.bfloat16, seed=9)
    storage = randn(5 * 64 + 1, dtype=torch.bfloat16, seed=10)
    x = storage[1:].view(5, 64)  # 2-byte aligned data pointer
    out = sparse_linear_2to4(x, values, meta, backend="extension")
    assert_close(out, reference.sparse_linear_2to4_ref(x, values, meta))
    xt = randn(64, 5, dtype=torch.bfloat16, seed=11).T
    assert_close(
        sparse_linear_2to4(xt, values, meta, backend="extension"), reference.sparse_linear_2to4_ref(xt, values, meta)
    )


# (N, Cin, H, W, Cout, kh, kw, stride, padding, dilation); Cin % 8 == 0 and Cin*kh*kw % 32 == 0.
CONV_GEOMETRIES = [
    (2, 32, 5, 6, 32, 1, 1, 1, 0, 1),
    (1, 32, 7, 7, 64, 3, 3, 1, 1, 1),
    (2, 16, 9, 8, 96, 2, 2, 2, 0, 1),
    (1, 8, 6, 9, 32, 2, 2, (1, 2), (1, 0), (2, 1)),
    (3, 64, 8, 8, 128, 3, 3, 2, 1, 1),
    (1, 32, 8, 8, 32, 3, 1, (2, 1), (0, 2), (1, 3)),
    (2, 320, 16, 16, 320, 3, 3, 1, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_conv_matches_reference(dtype, channels_last, geometry):
    _require_kernels()
    n, cin, h, w, cout, kh, kw, stride, padding, dilation = geometry
    mat, values, meta = packed(cout, cin * kh * kw, dtype)
    weight = prunedm.ops.matrix_to_conv_weight(mat, (cout, cin, kh, kw))
    x = randn(n, cin, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = sparse_conv2d_2to4(
        x, values, meta, weight.shape, stride=stride, padding=padding, dilation=dilation, backend="extension"
    )
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation).to(dtype)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_conv_epilogue(dtype, activation):
    _require_kernels()
    mat, values, meta = packed(64, 16 * 9, dtype, seed=12)
    x = randn(2, 16, 7, 6, dtype=dtype, seed=13)
    bias = randn(64, dtype=dtype, seed=14)
    residual = randn(2, 64, 7, 6, dtype=dtype, seed=15)
    shape = (64, 16, 3, 3)
    out = sparse_conv2d_2to4(x, values, meta, shape, bias, padding=1, activation=activation, residual=residual,
                             backend="extension")  # fmt: skip
    assert_close(out, reference.sparse_conv2d_2to4_ref(x, values, meta, shape, bias, 1, 1, 1, activation, residual))


def test_fallbacks_and_errors():
    _require_kernels()
    # Cin % 8 != 0: the extension refuses, auto falls back to the reference.
    mat, values, meta = packed(32, 4 * 8, torch.float16, seed=16)
    x = randn(1, 4, 6, 6, dtype=torch.float16, seed=17)
    usable, reason = prunedm.ops.sparse_kernels_available("cuda", conv_in_channels=4)
    assert not usable and "Cin" in reason
    with pytest.raises(RuntimeError, match="Cin % 8"):
        sparse_conv2d_2to4(x, values, meta, (32, 4, 4, 2), backend="extension")
    with pytest.raises(ValueError, match="multiple of 8"):
        torch.ops.prunedm.sparse_conv2d_2to4(x, values, meta, [32, 4, 4, 2], None, [1, 1], [0, 0], [1, 1], "none", None)
    out = sparse_conv2d_2to4(x, values, meta, (32, 4, 4, 2))
    assert_close(out, reference.sparse_conv2d_2to4_ref(x, values, meta, (32, 4, 4, 2)))
    # float32 has no CUDA kernel.
    dense = random_2to4(32, 32, torch.float32).cuda()
    v32, m32 = reference.compress_2to4_ref(dense)
    x32 = randn(3, 32, dtype=torch.float32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        torch.ops.prunedm.sparse_linear_2to4(x32, v32, m32, None, "none", None)
    assert_close(sparse_linear_2to4(x32, v32, m32), reference.sparse_linear_2to4_ref(x32, v32, m32))


def test_opcheck_cuda():
    _require_kernels()
    _, values, meta = packed(64, 64, torch.float16)
    x = randn(3, 64, dtype=torch.float16)
    torch.library.opcheck(torch.ops.prunedm.sparse_linear_2to4.default, (x, values, meta, None, "relu", None))
    mat, cv, cm = packed(32, 16 * 4, torch.bfloat16)
    xc = randn(2, 16, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    args = (xc, cv, cm, [32, 16, 2, 2], None, [1, 1], [1, 1], [1, 1], "none", None)
    torch.library.opcheck(torch.ops.prunedm.sparse_conv2d_2to4.default, args)
