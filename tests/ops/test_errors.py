"""Bad input gets a clear error naming the argument and the rule, the same on every backend."""

from __future__ import annotations

import pytest
import torch

import prunedm
from prunedm import ops

BACKENDS = ["reference"]
if prunedm.extension_info()["cpu"]["usable"]:
    BACKENDS.append("extension")
if prunedm.extension_info()["triton"]["usable"]:
    BACKENDS.append("triton")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.randn(4, 6),), ValueError, r"last dim of weight \(6\) must be divisible by m = 4"),
        ((torch.randn(4, 8), 5, 4), ValueError, r"n must be in \[0, m\] = \[0, 4\], got 5"),
        ((torch.randn(4, 8), 2, 0), ValueError, r"m must be in \[1, 64\], got 0"),
        ((torch.randn(4, 128), 2, 128), ValueError, r"m must be in \[1, 64\], got 128"),
        ((torch.ones(4, 8, dtype=torch.int32),), TypeError, r"weight must be a floating-point tensor"),
        ((torch.tensor(1.0),), ValueError, r"weight must have at least 1 dimension"),
        (([1.0, 2.0, 3.0, 4.0],), TypeError, r"weight must be a torch.Tensor"),
        ((torch.randn(4, 8), 2.0, 4), TypeError, r"n must be an int"),
    ],
)
def test_nm_mask_errors(backend, args, error, message):
    with pytest.raises(error, match=message):
        ops.nm_mask(*args, backend=backend)


def test_nm_violations_errors(backend):
    with pytest.raises(ValueError, match=r"last dim of t \(6\)"):
        ops.nm_violations(torch.randn(2, 6), backend=backend)
    with pytest.raises(TypeError, match=r"t must be real"):
        ops.is_nm_sparse(torch.randn(2, 4, dtype=torch.complex64), backend=backend)


@pytest.mark.parametrize(
    "dense,error,message",
    [
        (torch.zeros(32, 32, 2, dtype=torch.float16), ValueError, r"dense must be 2-D, got 3-D"),
        (torch.zeros(32, 32), TypeError, r"dense must be float16 or bfloat16, got torch.float32"),
        (torch.zeros(48, 32, dtype=torch.float16), ValueError, r"multiples of 32 and 32, got \[48, 32\]"),
        (torch.zeros(32, 16, dtype=torch.bfloat16), ValueError, r"multiples of 32 and 32, got \[32, 16\]"),
    ],
)
def test_compress_shape_and_dtype_errors(backend, dense, error, message):
    with pytest.raises(error, match=message):
        ops.compress_2to4(dense, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_refuses_groups_with_more_than_two_nonzeros(backend, dtype):
    dense = torch.zeros(64, 64, dtype=dtype)
    dense[5, 8:11] = 1.0  # three non-zeros in the group at columns 8..11
    dense[40, :4] = 2.0
    with pytest.raises(
        ValueError, match=r"2 group\(s\) .* more than 2 non-zeros \(the first at row 5, columns 8..11\)"
    ):
        ops.compress_2to4(dense, backend=backend)


def test_decompress_errors(backend):
    values = torch.zeros(32, 16, dtype=torch.float16)
    meta = torch.full((32, 2), 0x4444, dtype=torch.int16)
    with pytest.raises(TypeError, match=r"meta must be int16"):
        ops.decompress_2to4(values, meta.int(), backend=backend)
    with pytest.raises(ValueError, match=r"meta must be \[32, 2\]"):
        ops.decompress_2to4(values, meta[:, :1], backend=backend)
    with pytest.raises(TypeError, match=r"values must be float16 or bfloat16"):
        ops.decompress_2to4(values.float(), meta, backend=backend)
    bad = meta.clone()
    bad[3, 1] = 0x4440  # one nibble (0b0000) names index 0 twice
    with pytest.raises(ValueError, match=r"meta holds 1 invalid 2:4 index pair"):
        ops.decompress_2to4(values, bad, backend=backend)


def test_decompress_refuses_tensors_on_different_devices():
    values = torch.zeros(32, 16, dtype=torch.float16)
    meta = torch.zeros(32, 2, dtype=torch.int16, device="meta")
    with pytest.raises(ValueError, match=r"values and meta must be on one device"):
        ops.decompress_2to4(values, meta)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        ops.nm_mask(torch.randn(4), backend="cutlass")


def test_conv_layout_errors():
    with pytest.raises(ValueError, match=r"w must be 4-D"):
        ops.conv_weight_to_matrix(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"mat must be \[Cout, kh\*kw\*Cin\] = \[4, 27\]"):
        ops.matrix_to_conv_weight(torch.zeros(4, 26), (4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"shape must be 4 positive ints"):
        ops.matrix_to_conv_weight(torch.zeros(4, 27), (4, 27))


@pytest.mark.skipif(not prunedm.extension_info()["cpu"]["usable"], reason="extension not built")
def test_compiled_ops_raise_python_value_errors_directly():
    with pytest.raises(ValueError, match=r"compress_2to4: dense is not 2:4 sparse"):
        torch.ops.prunedm.compress_2to4(torch.ones(32, 32, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"compress_2to4: dense must be float16 or bfloat16"):
        torch.ops.prunedm.compress_2to4(torch.ones(32, 32))
    with pytest.raises(ValueError, match=r"nm_mask: the last dim of weight \(5\)"):
        torch.ops.prunedm.nm_mask(torch.ones(2, 5), 2, 4)
