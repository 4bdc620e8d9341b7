"""sparse_conv2d_2to4: the C++ twin of the CUDA implicit-GEMM kernel (backend="extension" on CPU) against the
reference and F.conv2d over strides, paddings, dilations, memory formats and epilogues; errors; opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, random_2to4

import prunedm
from prunedm.ops import reference, sparse_conv2d_2to4

pytestmark = pytest.mark.skipif(
    not prunedm.ops.sparse_kernels_available("cpu")[0], reason="extension (with the sparse mm ops) not built"
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_conv_weight(cout, cin, kh, kw, dtype, seed=0):
    """(dense conv weight [Cout, Cin, kh, kw], values, meta): 2:4 along K of the (kh, kw, Cin) matrix."""
    mat = random_2to4(cout, cin * kh * kw, dtype, seed=seed)
    values, meta = reference.compress_2to4_ref(mat)
    return reference.matrix_to_conv_weight_ref(mat, (cout, cin, kh, kw)), values, meta


def randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# (N, Cin, H, W, Cout, kh, kw, stride, padding, dilation); Cin*kh*kw is a multiple of 32.
GEOMETRIES = [
    (2, 32, 5, 6, 32, 1, 1, 1, 0, 1),
    (1, 32, 7, 7, 64, 3, 3, 1, 1, 1),
    (2, 16, 9, 8, 32, 2, 2, 2, 0, 1),
    (1, 8, 6, 9, 32, 2, 2, (1, 2), (1, 0), (2, 1)),
    (3, 4, 7, 5, 32, 4, 2, 1, (2, 1), 1),
    (1, 32, 8, 8, 32, 3, 1, (2, 1), (0, 2), (1, 3)),
    (1, 16, 3, 3, 32, 2, 2, 3, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_reference_and_conv2d(dtype, geometry):
    n, cin, h, w, cout, kh, kw, stride, padding, dilation = geometry
    weight, values, meta = packed_conv_weight(cout, cin, kh, kw, dtype)
    x = randn(n, cin, h, w, dtype=dtype)
    args = dict(stride=stride, padding=padding, dilation=dilation)
    out = sparse_conv2d_2to4(x, values, meta, weight.shape, backend="extension", **args)
    expected = F.conv2d(x.double(), weight.double(), None, stride, padding, dilation).to(dtype)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected)
    assert_close(out, reference.sparse_conv2d_2to4_ref(x, values, meta, weight.shape, None, stride, padding, dilation))


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_channels_last_input_and_output(dtype):
    weight, values, meta = packed_conv_weight(32, 32, 3, 3, dtype, seed=3)
    x = randn(2, 32, 6, 7, dtype=dtype, seed=4)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = sparse_conv2d_2to4(x_cl, values, meta, weight.shape, padding=1, backend="extension")
    out = sparse_conv2d_2to4(x, values, meta, weight.shape, padding=1, backend="extension")
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert out.is_contiguous()
    assert torch.equal(out_cl, out)
    assert_close(out, F.conv2d(x.double(), weight.double(), padding=1).to(dtype))


def test_strided_view_input():
    weight, values, meta = packed_conv_weight(32, 8, 2, 2, torch.float32, seed=5)
    big = randn(2, 16, 9, 11, dtype=torch.float32, seed=6)
    x = big[:, ::2, 1:, ::2]  # neither NCHW- nor NHWC-contiguous
    out = sparse_conv2d_2to4(x, values, meta, weight.shape, stride=2, backend="extension")
    assert_close(out, F.conv2d(x, weight, stride=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("residual_shape", [None, (2, 32, 4, 5), (32, 1, 1), (1, 1, 5)])
def test_epilogue(dtype, activation, residual_shape):
    weight, values, meta = packed_conv_weight(32, 16, 3, 2, dtype, seed=7)
    x = randn(2, 16, 6, 4, dtype=dtype, seed=8)
    bias = randn(32, dtype=dtype, seed=9)
    residual = None if residual_shape is None else randn(*residual_shape, dtype=dtype, seed=10)
    args = dict(stride=1, padding=(0, 1), dilation=1, activation=activation, residual=residual)
    out = sparse_conv2d_2to4(x, values, meta, weight.shape, bias, backend="extension", **args)
    assert out.shape == (2, 32, 4, 5)
    expected = reference.sparse_conv2d_2to4_ref(x, values, meta, weight.shape, bias, 1, (0, 1), 1, activation, residual)
    assert_close(out, expected)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(weight_shape=(32, 16, 2, 2)), ValueError, "does not match values"),
        (dict(weight_shape=(32, 8, 2)), ValueError, "weight_shape must be 4 positive ints"),
        (dict(input=torch.zeros(1, 4, 5, 5)), ValueError, "input must be \\[N, Cin, H, W\\] with Cin = 8"),
        (dict(input=torch.zeros(8, 5, 5)), ValueError, "input must be"),
        (dict(input=torch.zeros(1, 8, 1, 1)), ValueError, "does not fit the padded input"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(dilation=(1, 2, 3)), TypeError, "dilation must be an int or a pair"),
        (dict(bias=torch.zeros(8)), ValueError, "bias must be \\[32\\]"),
        (dict(residual=torch.zeros(2, 32, 4, 4)), ValueError, "does not broadcast"),
        (dict(activation="elu"), ValueError, "activation must be one of"),
    ],
)
def test_argument_errors(change, error, match):
    _, values, meta = packed_conv_weight(32, 8, 2, 2, torch.float32)
    args = dict(input=torch.zeros(1, 8, 5, 5), values=values, meta=meta, weight_shape=(32, 8, 2, 2), bias=None)
    kwargs = dict(stride=1, padding=0, dilation=1, activation="none", residual=None, backend="extension")
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=match):
        sparse_conv2d_2to4(*args.values(), **kwargs)


def test_extension_op_checks_arguments_itself():
    _, values, meta = packed_conv_weight(32, 8, 2, 2, torch.float32)
    x = torch.zeros(1, 8, 5, 5)
    with pytest.raises(ValueError, match="sparse_conv2d_2to4: stride must be >= 1"):
        torch.ops.prunedm.sparse_conv2d_2to4(x, values, meta, [32, 8, 2, 2], None, [0, 1], [0, 0], [1, 1], "none", None)
    with pytest.raises(ValueError, match="weight_shape"):
        torch.ops.prunedm.sparse_conv2d_2to4(x, values, meta, [32, 8, 2, 4], None, [1, 1], [0, 0], [1, 1], "none", None)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    weight, values, meta = packed_conv_weight(32, 16, 2, 2, torch.float16)
    x = randn(2, 16, 5, 4, dtype=torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = randn(32, dtype=torch.float16)
    residual = randn(32, 1, 1, dtype=torch.float16)
    args = (x, values, meta, list(weight.shape), bias, [2, 1], [1, 0], [1, 2], "relu", residual)
    torch.library.opcheck(torch.ops.prunedm.sparse_conv2d_2to4.default, args)


def test_auto_backend_on_cpu_is_the_reference():
    weight, values, meta = packed_conv_weight(32, 8, 2, 2, torch.float32, seed=11)
    x = randn(1, 8, 4, 4, dtype=torch.float32, seed=12)
    out = sparse_conv2d_2to4(x, values, meta, weight.shape)
    assert torch.equal(out, reference.sparse_conv2d_2to4_ref(x, values, meta, weight.shape))
