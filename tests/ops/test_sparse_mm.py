"""sparse_linear_2to4: the C++ twin of the CUDA kernel (backend="extension" on CPU) against the reference on odd
shapes, every dtype and epilogue; argument errors; opcheck; backend choice."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_close, random_2to4

import prunedm
from prunedm.ops import reference, sparse_linear_2to4

pytestmark = pytest.mark.skipif(
    not prunedm.ops.sparse_kernels_available("cpu")[0], reason="extension (with the sparse mm ops) not built"
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_weight(rows, cols, dtype, seed=0):
    """(dense W, values, meta) of a random 2:4 [rows, cols] matrix; the reference packer handles float32 too."""
    dense = random_2to4(rows, cols, dtype, seed=seed)
    values, meta = reference.compress_2to4_ref(dense)
    return dense, values, meta


def randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, rows, cols",
    [((1,), 32, 32), ((5,), 32, 64), ((2, 3), 64, 96), ((7,), 96, 160), ((3, 1, 2), 32, 32), ((0,), 32, 64)],
)
def test_matches_reference_and_dense(dtype, batch, rows, cols):
    dense, values, meta = packed_weight(rows, cols, dtype)
    x = randn(*batch, cols, dtype=dtype)
    out = sparse_linear_2to4(x, values, meta, backend="extension")
    assert out.shape == (*batch, rows) and out.dtype == dtype
    assert_close(out, reference.sparse_linear_2to4_ref(x, values, meta))
    # Independently of the reference: the dense matmul of the 2:4 matrix, in float64.
    expected = (x.double() @ dense.double().T).to(dtype)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("residual_shape", [None, (4, 3, 64), (64,), (3, 1), (1, 1, 64)])
def test_epilogue(dtype, activation, residual_shape):
    _, values, meta = packed_weight(64, 64, dtype, seed=2)
    x = randn(4, 3, 64, dtype=dtype, seed=3)
    bias = randn(64, dtype=dtype, seed=4)
    residual = None if residual_shape is None else randn(*residual_shape, dtype=dtype, seed=5)
    out = sparse_linear_2to4(x, values, meta, bias, activation=activation, residual=residual, backend="extension")
    expected = reference.sparse_linear_2to4_ref(x, values, meta, bias, activation, residual)
    assert_close(out, expected)
    # The epilogue is really applied: compare with the hand-written float64 formula.
    y = x.double() @ reference.decompress_2to4_ref(values, meta).double().T + bias.double()
    y = reference.apply_activation_ref(y, activation)
    if residual is not None:
        y = y + residual.double()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), y, rtol=2 * rtol, atol=2 * atol + (1e-5 if dtype == torch.float32 else 0))


def test_bias_only_and_strided_input():
    _, values, meta = packed_weight(32, 64, torch.float16, seed=6)
    x = randn(64, 9, dtype=torch.float16, seed=7).T  # a non-contiguous view [9, 64]
    bias = randn(32, dtype=torch.float16, seed=8)
    out = sparse_linear_2to4(x, values, meta, bias, backend="extension")
    assert_close(out, reference.sparse_linear_2to4_ref(x.contiguous(), values, meta, bias))


def test_relu_keeps_nan_and_zeroes_negatives():
    dense = torch.zeros(32, 32, dtype=torch.float32)
    dense[:, 0] = 1.0  # out[t, o] = x[t, 0]
    values, meta = reference.compress_2to4_ref(dense)
    x = torch.zeros(3, 32)
    x[:, 0] = torch.tensor([-2.0, 3.0, float("nan")])
    out = sparse_linear_2to4(x, values, meta, activation="relu", backend="extension")
    assert torch.equal(out[:2], torch.tensor([[0.0] * 32, [3.0] * 32]))
    assert out[2].isnan().all()


def test_invalid_metadata_is_an_error():
    _, values, meta = packed_weight(32, 32, torch.float16)
    with pytest.raises(ValueError, match="invalid 2:4 index pair"):
        sparse_linear_2to4(torch.ones(2, 32, dtype=torch.float16), values, torch.zeros_like(meta), backend="extension")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(values=torch.zeros(32, 17, dtype=torch.float16)), ValueError, "values must be"),
        (dict(values=torch.zeros(30, 16, dtype=torch.float16)), ValueError, "multiple of 32"),
        (dict(meta=torch.zeros(32, 3, dtype=torch.int16)), ValueError, "meta must be"),
        (dict(meta=torch.zeros(32, 2, dtype=torch.int32)), TypeError, "meta must be int16"),
        (dict(input=torch.zeros(2, 48, dtype=torch.float16)), ValueError, "input must be"),
        (dict(input=torch.zeros(2, 32, dtype=torch.float64)), TypeError, "input must be"),
        (dict(values=torch.zeros(32, 16, dtype=torch.bfloat16)), TypeError, "values must have input's dtype"),
        (dict(bias=torch.zeros(31, dtype=torch.float16)), ValueError, "bias must be"),
        (dict(bias=torch.zeros(32, dtype=torch.float32)), TypeError, "bias must have"),
        (dict(residual=torch.zeros(3, 32, dtype=torch.float16)), ValueError, "does not broadcast"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(activation=1), TypeError, "activation must be a str"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(backend="triton"), RuntimeError, "no triton kernel"),
    ],
)
def test_argument_errors(change, error, match):
    _, values, meta = packed_weight(32, 32, torch.float16)
    args = dict(input=torch.zeros(2, 32, dtype=torch.float16), values=values, meta=meta, bias=None)
    kwargs = dict(activation="none", residual=None, backend="extension")
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=match):
        sparse_linear_2to4(*args.values(), **kwargs)


def test_extension_op_checks_arguments_itself():
    """The C++ op raises the same kinds of errors when called directly."""
    _, values, meta = packed_weight(32, 32, torch.float16)
    x = torch.zeros(2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="sparse_linear_2to4: input must be"):
        torch.ops.prunedm.sparse_linear_2to4(x[:, :16], values, meta, None, "none", None)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.prunedm.sparse_linear_2to4(x, values, meta, None, "swish", None)
    with pytest.raises(TypeError, match="values must have input's dtype"):
        torch.ops.prunedm.sparse_linear_2to4(x.float(), values, meta, None, "none", None)


def test_backend_choice_and_autograd():
    _, values, meta = packed_weight(32, 32, torch.float32)
    x = randn(3, 32, dtype=torch.float32).requires_grad_()
    out = sparse_linear_2to4(x, values, meta)  # auto with autograd on: the differentiable reference
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no backward"):
        sparse_linear_2to4(x, values, meta, backend="extension")
    with torch.no_grad():
        assert_close(sparse_linear_2to4(x, values, meta, backend="extension"), sparse_linear_2to4(x, values, meta))


def test_sparse_kernels_available():
    assert prunedm.ops.sparse_kernels_available("cpu") == (True, "")
    usable, reason = prunedm.ops.sparse_kernels_available("meta")
    assert not usable and "meta" in reason
    if not torch.cuda.is_available():
        usable, reason = prunedm.ops.sparse_kernels_available("cuda")
        assert not usable and reason


@pytest.mark.parametrize("with_epilogue", [False, True])
def test_opcheck(with_epilogue):
    _, values, meta = packed_weight(64, 64, torch.float16)
    x = randn(2, 5, 64, dtype=torch.float16)
    bias = randn(64, dtype=torch.float16) if with_epilogue else None
    residual = randn(5, 64, dtype=torch.float16) if with_epilogue else None
    activation = "gelu_tanh" if with_epilogue else "none"
    torch.library.opcheck(torch.ops.prunedm.sparse_linear_2to4.default, (x, values, meta, bias, activation, residual))


def test_torch_compile_fullgraph():
    _, values, meta = packed_weight(32, 64, torch.bfloat16)
    x = randn(4, 64, dtype=torch.bfloat16)

    def f(x):
        return torch.ops.prunedm.sparse_linear_2to4(x, values, meta, None, "silu", None) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))
