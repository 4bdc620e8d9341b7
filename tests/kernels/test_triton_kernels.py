"""The Triton kernels (prunedm.kernels) against the reference and torch's CUTLASS converter.
Without a GPU they run on CPU tensors through Triton's interpreter, so shapes stay small."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# The interpreter must be on before triton decorates any kernel (conftest does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import FLOAT_DTYPES, SIXTEEN_BIT_DTYPES, random_2to4, weights_with_ties  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.sparse._semi_structured_conversions import (  # noqa: E402
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from prunedm import kernels, ops  # noqa: E402
from prunedm.ops import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU, and TRITON_INTERPRET=1 was not set before triton was imported",
)

NM_SHAPES = [
    (4,), (8,), (64,), (1, 4), (3, 8), (7, 12), (5, 3, 16), (2, 3, 5, 8), (33, 20), (1, 128),
    (17, 36), (9, 9, 4), (64, 4), (3, 1, 64), (6, 2, 2, 12), (31, 24), (2, 52), (11, 44), (3, 7, 32), (5, 64),
]  # fmt: skip
NM_PATTERNS = [(0, 4), (4, 4), (1, 2), (2, 2), (1, 1), (2, 8), (4, 8), (7, 8), (5, 16), (16, 16), (3, 6)]
WIDE_PATTERNS = [(0, 64), (1, 64), (17, 64), (64, 64), (9, 32), (3, 48), (20, 40)]
COMPRESS_SHAPES = [(32, 32), (32, 64), (64, 32), (64, 64), (96, 32), (32, 96), (32, 128), (64, 128), (128, 32)]
INT_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The int16 bit patterns of a 16-bit float tensor, on the CPU: equal means byte-identical."""
    return t.cpu().view(torch.int16)


def _assert_compress_matches(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, meta = kernels.compress_2to4(dense.to(DEVICE))
    ref_values, ref_meta = reference.compress_2to4_ref(dense.cpu())
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense.cpu().contiguous())
    assert values.dtype == dense.dtype and meta.dtype == torch.int16
    assert torch.equal(_bits(values), _bits(ref_values)) and torch.equal(meta.cpu(), ref_meta)
    assert torch.equal(_bits(values), _bits(oracle_values)) and torch.equal(meta.cpu(), oracle_meta)
    return values, meta


# nm_mask


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", NM_SHAPES)
def test_nm_mask_matches_reference(shape, dtype):
    w = weights_with_ties(shape, dtype, seed=len(shape) * 31 + shape[-1]).to(DEVICE)
    for n, m in [(2, 4), (1, 4), (0, 4), (4, 4)]:
        mask = kernels.nm_mask(w, n, m)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.equal(mask, reference.nm_mask_ref(w, n, m)), (n, m)


@pytest.mark.parametrize("n,m", NM_PATTERNS + WIDE_PATTERNS)
def test_nm_mask_other_patterns(n, m):
    for dtype in (torch.float32, torch.bfloat16):
        w = weights_with_ties((5, 2 * m), dtype, seed=m + n).to(DEVICE)
        assert torch.equal(kernels.nm_mask(w, n, m), reference.nm_mask_ref(w, n, m)), dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nm_mask_nan_inf_signed_zero_and_denormals(dtype):
    w = weights_with_ties((12, 16), torch.float32, seed=3).to(dtype)
    info = torch.finfo(dtype)
    w[0, 1] = float("nan")
    w[1, :4] = float("nan")
    w[2, :4] = torch.tensor([float("nan"), float("inf"), float("nan"), -float("inf")])
    w[3, 8:12] = float("-inf")
    w[4, :4] = torch.tensor([-0.0, 0.0, -0.0, 0.0])
    w[5, :4] = torch.tensor([info.smallest_normal / 4, -info.smallest_normal / 2, 0.0, info.smallest_normal / 4])
    w[6, :4] = torch.tensor([info.max, -info.max, info.tiny, -info.max])
    w = w.to(DEVICE)
    # NaNs with other payloads and signs are still NaN, and tie with each other.
    if dtype in SIXTEEN_BIT_DTYPES:
        w.view(torch.int16)[7, :4] = torch.tensor([0x7E01, -0x01, 0x7FFF, 0x7E00], dtype=torch.int16)
    for n, m in [(2, 4), (1, 4), (3, 4), (5, 16)]:
        assert torch.equal(kernels.nm_mask(w, n, m), reference.nm_mask_ref(w, n, m)), (n, m)


def test_nm_mask_noncontiguous_empty_and_float8():
    wt = weights_with_ties((32, 12), torch.float32, seed=1).to(DEVICE).t()
    assert not wt.is_contiguous()
    assert torch.equal(kernels.nm_mask(wt, 2, 4), reference.nm_mask_ref(wt, 2, 4))
    for shape in [(0, 8), (3, 0), (2, 0, 4)]:
        empty = torch.empty(shape, device=DEVICE)
        assert kernels.nm_mask(empty, 2, 4).shape == shape
    # float8 is widened to float32, which keeps every value and its order.
    w8 = torch.randn(6, 16).to(torch.float8_e4m3fn)
    assert torch.equal(kernels.nm_mask(w8.to(DEVICE), 2, 4).cpu(), reference.nm_mask_ref(w8.float(), 2, 4))


# nm_violations


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
def test_nm_violations_matches_reference(dtype):
    for index, shape in enumerate(NM_SHAPES[::2]):
        t = weights_with_ties(shape, torch.float32, seed=index).to(DEVICE)
        t = t.abs().to(dtype) if dtype in (torch.uint8, torch.bool) else t.to(dtype)
        for n, m in [(2, 4), (0, 4), (4, 4), (1, 2), (3, 8)]:
            if shape[-1] % m == 0:
                count = kernels.nm_violations(t, n, m)
                assert count.dtype == torch.int64 and count.dim() == 0
                assert torch.equal(count, reference.nm_violations_ref(t, n, m)), (shape, n, m)


@pytest.mark.parametrize("n,m", NM_PATTERNS + WIDE_PATTERNS)
def test_nm_violations_other_patterns(n, m):
    g = torch.Generator().manual_seed(m * 7 + n)
    t = torch.randn(9, 3 * m, generator=g) * (torch.rand(9, 3 * m, generator=g) < 0.6)
    t = t.to(DEVICE)
    assert torch.equal(kernels.nm_violations(t, n, m), reference.nm_violations_ref(t, n, m))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nm_violations_nan_is_nonzero_and_negative_zero_is_zero(dtype):
    t = torch.zeros(4, 8, dtype=dtype)
    t[0, :4] = torch.tensor([-0.0, -0.0, -0.0, 1.0])  # one non-zero
    t[1, :4] = torch.tensor([float("nan"), float("nan"), float("nan"), 0.0])  # three
    t[2, 4:] = torch.tensor([float("inf"), -0.0, -float("inf"), 2.0])  # three
    t = t.to(DEVICE)
    for n in range(5):
        assert torch.equal(kernels.nm_violations(t, n, 4), reference.nm_violations_ref(t, n, 4)), n
    assert int(kernels.nm_violations(t, 2, 4)) == 2


def test_nm_violations_noncontiguous_and_empty():
    t = weights_with_ties((16, 8), torch.float32, seed=5).to(DEVICE).t()
    assert torch.equal(kernels.nm_violations(t, 1, 4), reference.nm_violations_ref(t, 1, 4))
    assert int(kernels.nm_violations(torch.empty(0, 8, device=DEVICE), 2, 4)) == 0


# compress_2to4 / decompress_2to4


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
@pytest.mark.parametrize("shape", COMPRESS_SHAPES)
def test_compress_matches_reference_and_oracle(shape, dtype):
    dense = random_2to4(*shape, dtype, seed=shape[0] + shape[1])
    values, meta = _assert_compress_matches(dense)
    restored = kernels.decompress_2to4(values, meta)
    assert torch.equal(_bits(restored), _bits(reference.decompress_2to4_ref(values.cpu(), meta.cpu())))
    assert torch.equal(restored.cpu(), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_every_pattern_of_at_most_two_nonzeros(dtype):
    # All 11 non-zero patterns with 0, 1 or 2 non-zeros, each in every group position of a row.
    patterns = [bits for bits in range(16) if bin(bits).count("1") <= 2]
    groups = torch.tensor([[float((bits >> i) & 1) * (i + 1) for i in range(4)] for bits in patterns])
    dense = groups[torch.arange(32 * 16) % len(patterns)].reshape(32, 64)
    dense = (dense * torch.where(torch.arange(64) % 3 == 0, -1.0, 1.0)).to(dtype)
    values, meta = _assert_compress_matches(dense)
    assert torch.equal(kernels.decompress_2to4(values, meta).cpu(), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_keeps_exact_bits(dtype):
    bits = torch.zeros(32, 32, dtype=torch.int16)
    bits[0, :4] = torch.tensor([0, 0, 0, -0x8000])  # -0.0 in a slot a zero group keeps
    bits[1, :4] = torch.tensor([-0x8000, 0, 0x3C00, -0x0103])  # -0.0 left out
    bits[2, 4:8] = torch.tensor([0x0001, -0x8000, 0, -0x7FFF])  # denormals around a -0.0
    bits[3, 8:12] = torch.tensor([0x7C00, -0x8000, -0x8000, 0])  # fp16 +inf (a normal number in bf16)
    values, meta = _assert_compress_matches(bits.view(dtype))
    # A -0.0 that is not kept comes back as +0.0, as in the reference.
    restored = _bits(kernels.decompress_2to4(values, meta))
    assert torch.equal(restored, _bits(reference.decompress_2to4_ref(values.cpu(), meta.cpu())))


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_keeps_nan_payloads(dtype):
    # The reference and torch's converter move values through float on the CPU, which rewrites
    # NaNs (fp16 signalling NaNs are quieted, bf16 NaNs become 0xFFFF); the kernels move bits.
    bits = torch.zeros(32, 32, dtype=torch.int16)
    bits[1, :4] = torch.tensor([0x7FC1, 0, -0x8000, 0x7F81])  # bf16 quiet / signalling NaN
    bits[4, 12:16] = torch.tensor([0, 0x7C01, 0, -0x01FF])  # fp16 signalling NaNs
    bits[7, 16:20] = torch.tensor([-0x0103, 0, 0, 0x7E05])  # fp16 quiet NaNs
    dense = bits.view(dtype)
    values, meta = kernels.compress_2to4(dense.to(DEVICE))
    ref_values, ref_meta = reference.compress_2to4_ref(dense)
    assert torch.equal(meta.cpu(), ref_meta)
    assert torch.equal(values.cpu().isnan(), ref_values.isnan())
    assert torch.equal(_bits(values)[1, :2], torch.tensor([0x7FC1, 0x7F81], dtype=torch.int16))
    assert torch.equal(_bits(values)[4, 6:8], torch.tensor([0x7C01, -0x01FF], dtype=torch.int16))
    assert torch.equal(_bits(values)[7, 8:10], torch.tensor([-0x0103, 0x7E05], dtype=torch.int16))
    restored = _bits(kernels.decompress_2to4(values, meta))
    assert torch.equal(restored, torch.where(bits == -0x8000, 0, bits))


def test_compress_all_zero_and_noncontiguous():
    _assert_compress_matches(torch.zeros(64, 64, dtype=torch.float16))
    dense_t = random_2to4(64, 32, torch.bfloat16, seed=9).t()  # a 2:4 transpose is rarely 2:4, so prune it
    dense_t = dense_t * reference.nm_mask_ref(dense_t, 2, 4)
    assert not dense_t.is_contiguous()
    _assert_compress_matches(dense_t)


def test_decompress_matches_oracle():
    dense = random_2to4(64, 128, torch.float16, seed=4)
    values, meta = sparse_semi_structured_from_dense_cutlass(dense)
    restored = kernels.decompress_2to4(values.to(DEVICE), meta.to(DEVICE)).cpu()
    assert torch.equal(restored, sparse_semi_structured_to_dense_cutlass(values, meta))
    assert torch.equal(restored, dense)


def test_empty_matrices():
    for shape in [(0, 32), (32, 0)]:
        values, meta = kernels.compress_2to4(torch.empty(shape, dtype=torch.float16, device=DEVICE))
        assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], shape[1] // 16)
        assert kernels.decompress_2to4(values, meta).shape == shape


@settings(max_examples=8, deadline=None)
@given(
    rows=st.sampled_from([32, 64]),
    cols=st.sampled_from([32, 64, 96, 128]),
    dtype=st.sampled_from(SIXTEEN_BIT_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(rows, cols, dtype, seed):
    dense = random_2to4(rows, cols, dtype, seed=seed)
    values, meta = _assert_compress_matches(dense)
    assert torch.equal(kernels.decompress_2to4(values, meta).cpu(), dense)  # -0.0 left out comes back as 0.0


# Errors, through the public API


def test_compress_refuses_more_than_two_nonzeros_like_the_reference():
    dense = random_2to4(32, 64, torch.float16, seed=2)
    dense[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float16)
    dense[9, 0:4] = torch.tensor([1.0, float("nan"), 3.0, 4.0], dtype=torch.float16)
    dense = dense.to(DEVICE)
    with pytest.raises(ValueError, match=r"2 group\(s\) of 4 along a row.*the first at row 5, columns 8..11") as error:
        ops.compress_2to4(dense, backend="triton")
    with pytest.raises(ValueError) as expected:
        ops.compress_2to4(dense.cpu(), backend="reference")
    assert str(error.value) == str(expected.value)


def test_decompress_refuses_invalid_metadata_like_the_reference():
    values, meta = kernels.compress_2to4(random_2to4(32, 64, torch.bfloat16, seed=6).to(DEVICE))
    bad_meta = meta.clone()
    bad_meta[0, 0] = 0  # four nibbles 0b0000: index 0 twice
    bad_meta[3, 1] = bad_meta[3, 1] & ~0xF | 0b0111  # indices 3 then 1
    with pytest.raises(ValueError, match=r"meta holds 5 invalid 2:4 index pair\(s\)") as error:
        ops.decompress_2to4(values, bad_meta, backend="triton")
    with pytest.raises(ValueError) as expected:
        ops.decompress_2to4(values.cpu(), bad_meta.cpu(), backend="reference")
    assert str(error.value) == str(expected.value)


def test_public_api_routes_to_the_kernels():
    w = weights_with_ties((8, 16), torch.float16, seed=8).to(DEVICE)
    assert torch.equal(ops.nm_mask(w, 2, 4, backend="triton"), reference.nm_mask_ref(w, 2, 4))
    assert ops.nm_violations(w, 1, 4, backend="triton") == int(reference.nm_violations_ref(w, 1, 4))
    assert ops.is_nm_sparse(w * ops.nm_mask(w, backend="triton"), backend="triton")
    dense = random_2to4(32, 32, torch.float16, seed=8).to(DEVICE)
    values, meta = ops.compress_2to4(dense, backend="triton")
    assert torch.equal(ops.decompress_2to4(values, meta, backend="triton"), dense)


# torch.library registration


def _opcheck_cases():
    w = torch.randn(6, 16, device=DEVICE)
    dense = random_2to4(32, 32, torch.float16, seed=1).to(DEVICE)
    values, meta = kernels.compress_2to4(dense)
    return {
        "nm_mask": (torch.ops.prunedm_triton.nm_mask.default, (w, 2, 4)),
        "nm_mask_fp64_m8": (torch.ops.prunedm_triton.nm_mask.default, (w.double(), 3, 8)),
        "nm_violations": (torch.ops.prunedm_triton.nm_violations.default, (w, 1, 4)),
        "compress_2to4": (torch.ops.prunedm_triton.compress_2to4.default, (dense,)),
        "compress_2to4_bf16": (torch.ops.prunedm_triton.compress_2to4.default, (dense.bfloat16(),)),
        "decompress_2to4": (torch.ops.prunedm_triton.decompress_2to4.default, (values, meta)),
    }


@pytest.mark.parametrize(
    "case", ["nm_mask", "nm_mask_fp64_m8", "nm_violations", "compress_2to4", "compress_2to4_bf16", "decompress_2to4"]
)
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# Compiling for a GPU without one: catches what the interpreter accepts but the compiler refuses.

_COMPILE_FOR_SM80 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from prunedm.kernels import nm, sparse24

def build(kernel, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 80, 32))

sizes = {"groups": "i64", "n": "i32", "m": "i32"}
build(nm._nm_mask_kernel, {"bits_ptr": "*i16", "keep_ptr": "*u8", **sizes},
      {"MAGNITUDE_MASK": 0x7FFF, "INF_BITS": 0x7C00, "M": 4, "BLOCK_G": 512})
build(nm._nm_mask_kernel, {"bits_ptr": "*i64", "keep_ptr": "*u8", **sizes},
      {"MAGNITUDE_MASK": 2**63 - 1, "INF_BITS": 0x7FF0 << 48, "M": 64, "BLOCK_G": 2})
build(nm._nm_violations_kernel, {"bits_ptr": "*i8", "partial_ptr": "*i32", **sizes},
      {"NONZERO_MASK": -1, "M": 8, "BLOCK_G": 512})
meta_sizes = {"rows": "i32", "meta_cols": "i32", "meta_elements": "i64"}
build(sparse24._compress_2to4_kernel, {"dense_ptr": "*i16", "values_ptr": "*i16", "meta_ptr": "*i16",
      "partial_ptr": "*i32", **meta_sizes}, {"NIBBLE_TABLE": sparse24._NIBBLE_TABLE, "BLOCK": 128})
build(sparse24._decompress_2to4_kernel, {"values_ptr": "*i16", "meta_ptr": "*i16", "dense_ptr": "*i16",
      "partial_ptr": "*i32", **meta_sizes}, {"BLOCK": 128})
"""


def _can_compile_for_nvidia() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU every test above compiles the kernels")
@pytest.mark.skipif(not _can_compile_for_nvidia(), reason="this triton has no NVIDIA backend")
def test_kernels_compile_for_sm80():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM80], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
