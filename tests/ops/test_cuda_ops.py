"""The CUDA kernels against the reference, the CPU kernels, torch's CUTLASS converter and torch.sparse's
semi-structured matmul; and the Triton kernels against the CUDA kernels."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FLOAT_DTYPES, SIXTEEN_BIT_DTYPES, random_2to4, weights_with_ties
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import prunedm
from prunedm import ops
from prunedm.ops import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"

NM_SHAPES = [
    (4,), (8,), (1, 4), (3, 8), (7, 12), (5, 3, 16), (2, 3, 5, 8), (64, 64), (33, 100), (1, 1024),
    (17, 36), (9, 9, 4), (128, 4), (3, 1, 64), (6, 2, 2, 12), (31, 20), (2, 52), (11, 44), (256, 16), (5, 320),
    (1, 1, 1, 4), (13, 7, 28), (1000, 8),
]  # fmt: skip
COMPRESS_SHAPES = [
    (32, 32), (32, 64), (64, 32), (64, 64), (96, 32), (32, 96), (128, 128), (160, 64), (64, 160), (192, 224),
    (256, 32), (32, 512), (288, 96), (96, 288), (320, 320), (128, 1024), (1024, 64), (224, 480), (352, 32), (64, 736),
]  # fmt: skip
NM_PATTERNS = [(2, 4), (1, 4), (0, 4), (4, 4), (1, 2), (4, 8), (2, 8), (8, 16), (3, 32), (17, 64), (64, 64), (1, 1)]
REAL_DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
]  # fmt: skip


def _first_line(exc: BaseException) -> str:
    # The message without any C++ stack trace (shown under TORCH_SHOW_CPP_STACKTRACES=1).
    return str(exc).splitlines()[0]


def _assert_round_trip(dense_back: torch.Tensor, dense: torch.Tensor) -> None:
    """Decompression gives the matrix back by value (random_2to4 has -0.0 zeros, returned as 0.0)."""
    assert dense_back.dtype == dense.dtype and dense_back.device.type == DEVICE
    assert torch.equal(dense_back.cpu(), dense.cpu())


def _assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bytes (so NaN == NaN and -0.0 != 0.0), compared on the CPU."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    view = torch.int16 if actual.element_size() == 2 else None
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert torch.equal(a.view(view) if view else a, e.view(view) if view else e)


def test_cuda_kernels_are_built_and_registered():
    info = prunedm.extension_info()
    assert info["cuda"]["usable"], info["cuda"]["reason"]
    for op in ("nm_mask", "nm_violations", "compress_2to4", "decompress_2to4"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"prunedm::{op}", "CUDA"), op


# --- nm_mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", NM_SHAPES)
def test_nm_mask_matches_reference(shape, dtype):
    w = weights_with_ties(shape, dtype, seed=len(shape) * 31 + shape[-1])
    for n, m in [(2, 4), (1, 4), (3, 4)]:
        mask = ops.nm_mask(w.to(DEVICE), n, m, backend="extension")
        assert mask.device.type == DEVICE and mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.equal(mask.cpu(), reference.nm_mask_ref(w, n, m))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,m", NM_PATTERNS)
def test_nm_mask_other_patterns(n, m, dtype):
    w = weights_with_ties((6, 3, 2 * m), dtype, seed=m * 5 + n)
    mask = ops.nm_mask(w.to(DEVICE), n, m, backend="extension")
    assert torch.equal(mask.cpu(), reference.nm_mask_ref(w, n, m))
    assert torch.equal(mask.cpu(), ops.nm_mask(w, n, m, backend="extension"))  # the CPU kernel


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nm_mask_nan_inf_signed_zero_and_ties(dtype):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    w[0, 1] = float("nan")
    w[1, :4] = float("nan")  # a whole group of NaNs: the lowest indices win
    w[2, 5] = float("inf")
    w[3, 8:12] = float("-inf")
    w[4, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])  # all equal: indices 0 and 1
    w[5, 4:8] = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    w[6, 8:12] = torch.tensor([float("nan"), float("inf"), float("nan"), -float("inf")])
    w[7, 12:16] = torch.tensor([-0.0, float("nan"), 0.0, 2.0])
    for n, m in [(2, 4), (1, 4), (3, 8), (5, 16)]:
        assert torch.equal(ops.nm_mask(w.to(DEVICE), n, m, backend="extension").cpu(), reference.nm_mask_ref(w, n, m))


def test_nm_mask_noncontiguous_and_empty():
    wt = torch.randn(64, 16, device=DEVICE).t()
    assert not wt.is_contiguous()
    assert torch.equal(ops.nm_mask(wt, backend="extension").cpu(), reference.nm_mask_ref(wt.cpu()))
    sliced = torch.randn(8, 40, device=DEVICE, dtype=torch.float16)[:, 3:35]  # odd storage offset
    assert torch.equal(ops.nm_mask(sliced, backend="extension").cpu(), reference.nm_mask_ref(sliced.cpu()))
    for shape in [(0, 8), (3, 0), (2, 0, 4)]:
        mask = ops.nm_mask(torch.empty(shape, device=DEVICE), backend="extension")
        assert mask.shape == shape and mask.dtype == torch.bool and mask.device.type == DEVICE


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nm_mask_large_tensor_uses_every_thread(dtype):
    # More groups than the kernel's grid has threads: exercises the grid-stride loop.
    w = torch.randn(4096, 2304, device=DEVICE).to(dtype)
    for n, m in [(2, 4), (4, 8)]:
        assert torch.equal(ops.nm_mask(w, n, m, backend="extension"), reference.nm_mask_ref(w, n, m))


# --- nm_violations ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", REAL_DTYPES)
def test_nm_violations_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    t = (torch.rand(37, 48, generator=g) < 0.45).to(dtype)
    for n, m in [(2, 4), (1, 4), (0, 4), (4, 4), (3, 8), (5, 16), (7, 48)]:
        count = torch.ops.prunedm.nm_violations(t.to(DEVICE), n, m)
        assert count.device.type == DEVICE and count.dtype == torch.int64 and count.dim() == 0
        assert int(count) == int(reference.nm_violations_ref(t, n, m)) == int(torch.ops.prunedm.nm_violations(t, n, m))
        assert ops.nm_violations(t.to(DEVICE), n, m, backend="extension") == int(count)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nm_violations_signed_zero_and_nan(dtype):
    t = torch.zeros(4, 8, dtype=dtype)
    t[0, :4] = torch.tensor([-0.0, -0.0, -0.0, 1.0])  # -0.0 is zero: 1 non-zero
    t[1, :4] = torch.tensor([float("nan"), float("nan"), float("nan"), 0.0])  # NaN is not: 3 non-zeros
    t[2, 4:] = torch.tensor([1e-30, -1e-30, 1.0, 0.0])  # tiny values count (bf16/fp32/fp64 keep them)
    for n in range(5):
        assert int(torch.ops.prunedm.nm_violations(t.to(DEVICE), n, 4)) == int(reference.nm_violations_ref(t, n, 4))
        assert int(torch.ops.prunedm.nm_violations(t.to(DEVICE), n, 4)) == int(torch.ops.prunedm.nm_violations(t, n, 4))


def test_nm_violations_large_noncontiguous_and_empty():
    # Many blocks add into the one counter.
    t = (torch.rand(3000, 4096, device=DEVICE) < 0.6).half()
    assert int(torch.ops.prunedm.nm_violations(t, 2, 4)) == int(reference.nm_violations_ref(t, 2, 4))
    tt = t[:512, :512].t()
    assert not tt.is_contiguous()
    assert int(torch.ops.prunedm.nm_violations(tt, 2, 4)) == int(reference.nm_violations_ref(tt, 2, 4))
    empty = torch.ops.prunedm.nm_violations(torch.empty(0, 8, device=DEVICE), 2, 4)
    assert empty.device.type == DEVICE and empty.dim() == 0 and int(empty) == 0
    assert ops.is_nm_sparse(t * ops.nm_mask(t), backend="extension")
    assert not ops.is_nm_sparse(torch.ones(4, 8, device=DEVICE), backend="extension")


# --- compress_2to4 / decompress_2to4 ------------------------------------------------------------


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
@pytest.mark.parametrize("shape", COMPRESS_SHAPES)
def test_compress_matches_oracle(shape, dtype):
    dense = random_2to4(*shape, dtype, seed=shape[0] + 3 * shape[1])
    values, meta = ops.compress_2to4(dense.to(DEVICE), backend="extension")
    assert values.device.type == DEVICE and meta.device.type == DEVICE
    assert values.dtype == dtype and meta.dtype == torch.int16
    assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], shape[1] // 16)
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense)  # on the CPU
    _assert_bitwise_equal(values, oracle_values)
    _assert_bitwise_equal(meta, oracle_meta)
    _assert_round_trip(ops.decompress_2to4(values, meta, backend="extension"), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_every_group_pattern_with_special_values(dtype):
    # The 11 patterns with at most two non-zeros, in every group position of a 32x64 tile; the
    # non-zeros include NaN, inf and tiny values, the zeros include -0.0 (all packed bit for bit).
    patterns = [p for p in itertools.product([0, 1], repeat=4) if sum(p) <= 2]
    specials = [1.0, -2.5, float("nan"), float("inf"), -float("inf"), 1e-7, -3.0]
    rows = []
    for r in range(32):
        row = []
        for g in range(16):
            pattern = patterns[(r + 3 * g) % len(patterns)]
            zero = -0.0 if (r + g) % 3 == 0 else 0.0
            row += [specials[(r + g + i) % len(specials)] if bit else zero for i, bit in enumerate(pattern)]
        rows.append(row)
    dense = torch.tensor(rows, dtype=torch.float32).to(dtype)
    values, meta = torch.ops.prunedm.compress_2to4(dense.to(DEVICE))
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense)
    _assert_bitwise_equal(values, oracle_values)
    _assert_bitwise_equal(meta, oracle_meta)
    cpu_values, cpu_meta = torch.ops.prunedm.compress_2to4(dense)
    _assert_bitwise_equal(values, cpu_values)
    _assert_bitwise_equal(meta, cpu_meta)
    # Not bitwise equal to dense: a kept -0.0 comes back as 0.0 where decompress fills zeros.
    _assert_bitwise_equal(
        torch.ops.prunedm.decompress_2to4(values, meta), torch.ops.prunedm.decompress_2to4(cpu_values, cpu_meta)
    )


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_magnitude_pruned_weights(dtype):
    w = weights_with_ties((128, 256), dtype).to(DEVICE)
    dense = w * ops.nm_mask(w, backend="extension")
    values, meta = ops.compress_2to4(dense, backend="extension")
    ref_values, ref_meta = reference.compress_2to4_ref(dense)
    _assert_bitwise_equal(values, ref_values)
    _assert_bitwise_equal(meta, ref_meta)
    _assert_round_trip(ops.decompress_2to4(values, meta, backend="extension"), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_and_decompress_unaligned_and_noncontiguous(dtype):
    # Storage offsets that are not 16/32-byte aligned take the scalar (non-vectorised) path.
    dense = random_2to4(64, 96, dtype, seed=5)
    buffer = torch.zeros(64 * 96 + 1, dtype=dtype, device=DEVICE)
    shifted = buffer[1:].view(64, 96)
    shifted.copy_(dense)
    values, meta = ops.compress_2to4(shifted, backend="extension")
    oracle_values, oracle_meta = sparse_semi_structured_from_dense_cutlass(dense)
    _assert_bitwise_equal(values, oracle_values)
    _assert_bitwise_equal(meta, oracle_meta)

    strided = torch.empty(96, 64, dtype=dtype, device=DEVICE).t()
    strided.copy_(dense)
    assert not strided.is_contiguous()
    values_s, meta_s = ops.compress_2to4(strided, backend="extension")
    _assert_bitwise_equal(values_s, oracle_values)
    _assert_bitwise_equal(meta_s, oracle_meta)

    value_buffer = torch.zeros(values.numel() + 3, dtype=dtype, device=DEVICE)
    shifted_values = value_buffer[3:].view(values.shape)
    shifted_values.copy_(values)
    meta_t = torch.empty(meta.shape[1], meta.shape[0], dtype=torch.int16, device=DEVICE).t()
    meta_t.copy_(meta)
    _assert_round_trip(ops.decompress_2to4(shifted_values, meta_t, backend="extension"), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_large_matrix_uses_every_thread(dtype):
    # More (row, chunk) pairs than the kernel's grid has threads; groups with 0, 1 and 2 non-zeros.
    g = torch.Generator(device=DEVICE).manual_seed(11)
    w = torch.randn(8192, 4096, device=DEVICE, generator=g).to(dtype)
    dense = w * reference.nm_mask_ref(w) * (torch.rand(w.shape, device=DEVICE, generator=g) < 0.7)
    values, meta = ops.compress_2to4(dense, backend="extension")
    ref_values, ref_meta = reference.compress_2to4_ref(dense)
    _assert_bitwise_equal(values, ref_values)
    _assert_bitwise_equal(meta, ref_meta)
    _assert_round_trip(ops.decompress_2to4(values, meta, backend="extension"), dense)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
@pytest.mark.parametrize("shape", [(32, 32), (64, 128), (96, 64), (256, 512)])
def test_decompress_matches_reference(shape, dtype):
    # Any valid metadata, not only what compress_2to4 makes: every valid nibble at random.
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    valid = torch.tensor([0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110])
    nibbles = valid[torch.randint(0, len(valid), (shape[0] * shape[1] // 16, 4), generator=g)]
    meta = ((nibbles << torch.tensor([0, 4, 8, 12])).sum(-1) + 2**15) % 2**16 - 2**15
    meta = meta.to(torch.int16).reshape(shape[0], shape[1] // 16)
    values = torch.randn(shape[0], shape[1] // 2, generator=g).to(dtype)
    dense = torch.ops.prunedm.decompress_2to4(values.to(DEVICE), meta.to(DEVICE))
    _assert_bitwise_equal(dense, reference.decompress_2to4_ref(values, meta))
    _assert_bitwise_equal(dense, torch.ops.prunedm.decompress_2to4(values, meta))


def test_compress_and_decompress_empty():
    for rows, cols in [(0, 32), (32, 0), (0, 0)]:
        values, meta = torch.ops.prunedm.compress_2to4(torch.empty(rows, cols, dtype=torch.float16, device=DEVICE))
        assert values.shape == (rows, cols // 2) and meta.shape == (rows, cols // 16)
        dense = torch.ops.prunedm.decompress_2to4(values, meta)
        assert dense.shape == (rows, cols) and dense.device.type == DEVICE


def test_ops_run_on_a_side_stream():
    dense = random_2to4(256, 256, torch.float16, seed=2).to(DEVICE)
    expected_values, expected_meta = reference.compress_2to4_ref(dense)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        values, meta = torch.ops.prunedm.compress_2to4(dense)
        back = torch.ops.prunedm.decompress_2to4(values, meta)
        mask = torch.ops.prunedm.nm_mask(dense, 2, 4)
        count = torch.ops.prunedm.nm_violations(dense, 1, 4)
    stream.synchronize()
    _assert_bitwise_equal(values, expected_values)
    _assert_bitwise_equal(meta, expected_meta)
    _assert_round_trip(back, dense)
    assert torch.equal(mask, reference.nm_mask_ref(dense))
    assert int(count) == int(reference.nm_violations_ref(dense, 1, 4))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_follow_the_input_device():
    dense = random_2to4(64, 64, torch.float16, seed=4).to("cuda:1")
    values, meta = torch.ops.prunedm.compress_2to4(dense)
    assert values.device == dense.device and meta.device == dense.device
    _assert_round_trip(torch.ops.prunedm.decompress_2to4(values, meta), dense)
    assert torch.ops.prunedm.nm_mask(dense, 2, 4).device == dense.device
    assert torch.ops.prunedm.nm_violations(dense, 2, 4).device == dense.device


# --- errors: the same types and messages as the CPU kernels --------------------------------------


def _assert_same_error(fn, cpu_args, cuda_args, error):
    with pytest.raises(error) as cpu_error:
        fn(*cpu_args)
    with pytest.raises(error) as cuda_error:
        fn(*cuda_args)
    assert _first_line(cuda_error.value) == _first_line(cpu_error.value)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
def test_compress_refuses_groups_with_more_than_two_nonzeros(dtype):
    dense = torch.zeros(64, 64, dtype=dtype)
    dense[5, 8:11] = 1.0  # three non-zeros in the group at columns 8..11
    dense[40, :4] = 2.0
    dense[41, 4:8] = torch.tensor([float("nan"), float("nan"), float("nan"), 0.0])  # NaN is non-zero
    dense[42, 8:12] = torch.tensor([1.0, -0.0, 1.0, -0.0])  # -0.0 is zero: fine
    with pytest.raises(
        ValueError, match=r"3 group\(s\) .* more than 2 non-zeros \(the first at row 5, columns 8..11\)"
    ):
        ops.compress_2to4(dense.to(DEVICE), backend="extension")
    _assert_same_error(torch.ops.prunedm.compress_2to4, (dense,), (dense.to(DEVICE),), ValueError)
    late = torch.zeros(96, 128, dtype=dtype)
    late[95, 124:] = 1.0  # the very last group
    _assert_same_error(torch.ops.prunedm.compress_2to4, (late,), (late.to(DEVICE),), ValueError)
    with pytest.raises(ValueError, match=r"1 group\(s\) .* \(the first at row 95, columns 124..127\)"):
        torch.ops.prunedm.compress_2to4(late.to(DEVICE))


def test_compress_shape_and_dtype_errors():
    for dense, error in [
        (torch.zeros(32, 32, 2, dtype=torch.float16), ValueError),
        (torch.zeros(32, 32), TypeError),
        (torch.zeros(48, 32, dtype=torch.float16), ValueError),
        (torch.zeros(32, 16, dtype=torch.bfloat16), ValueError),
    ]:
        _assert_same_error(torch.ops.prunedm.compress_2to4, (dense,), (dense.to(DEVICE),), error)


def test_decompress_errors():
    values = torch.zeros(32, 16, dtype=torch.float16)
    meta = torch.full((32, 2), 0x4444, dtype=torch.int16)
    bad = meta.clone()
    bad[3, 1] = 0x4440  # one nibble (0b0000) names index 0 twice
    bad[7, 0] = 0x0000  # four more
    fn = torch.ops.prunedm.decompress_2to4
    _assert_same_error(fn, (values, bad), (values.to(DEVICE), bad.to(DEVICE)), ValueError)
    with pytest.raises(ValueError, match=r"meta holds 5 invalid 2:4 index pair"):
        fn(values.to(DEVICE), bad.to(DEVICE))
    one_bad = meta.clone()
    one_bad[3, 1] = 0x4440
    with pytest.raises(ValueError, match=r"meta holds 1 invalid 2:4 index pair"):
        ops.decompress_2to4(values.to(DEVICE), one_bad.to(DEVICE), backend="extension")
    _assert_same_error(fn, (values, meta.int()), (values.to(DEVICE), meta.int().to(DEVICE)), TypeError)
    _assert_same_error(fn, (values, meta[:, :1]), (values.to(DEVICE), meta[:, :1].to(DEVICE)), ValueError)
    _assert_same_error(fn, (values.float(), meta), (values.float().to(DEVICE), meta.to(DEVICE)), TypeError)
    with pytest.raises(ValueError, match=r"values and meta must be on one device"):
        fn(values.to(DEVICE), meta)


def test_nm_mask_and_violations_errors():
    cases = [
        (torch.ops.prunedm.nm_mask, (torch.randn(4, 6), 2, 4), ValueError),
        (torch.ops.prunedm.nm_mask, (torch.randn(4, 8), 5, 4), ValueError),
        (torch.ops.prunedm.nm_mask, (torch.randn(4, 8), 2, 0), ValueError),
        (torch.ops.prunedm.nm_mask, (torch.randn(4, 128), 2, 128), ValueError),
        (torch.ops.prunedm.nm_mask, (torch.ones(4, 8, dtype=torch.int32), 2, 4), TypeError),
        (torch.ops.prunedm.nm_mask, (torch.tensor(1.0), 2, 4), ValueError),
        (torch.ops.prunedm.nm_violations, (torch.randn(2, 6), 2, 4), ValueError),
        (torch.ops.prunedm.nm_violations, (torch.randn(2, 4, dtype=torch.complex64), 2, 4), TypeError),
        (torch.ops.prunedm.nm_violations, (torch.randn(2, 4), -1, 4), ValueError),
    ]
    for fn, args, error in cases:
        cuda_args = (args[0].to(DEVICE), *args[1:])
        _assert_same_error(fn, args, cuda_args, error)


# --- opcheck --------------------------------------------------------------------------------------


def _opcheck_cases():
    w = torch.randn(6, 16, device=DEVICE)
    dense = random_2to4(64, 64, torch.float16).to(DEVICE)
    values, meta = torch.ops.prunedm.compress_2to4(dense)
    return [
        (torch.ops.prunedm.nm_mask.default, (w, 2, 4)),
        (torch.ops.prunedm.nm_mask.default, (w.half(), 2, 4)),
        (torch.ops.prunedm.nm_mask.default, (w.double(), 1, 8)),
        (torch.ops.prunedm.nm_violations.default, (w, 2, 4)),
        (torch.ops.prunedm.nm_violations.default, (w > 0, 1, 8)),
        (torch.ops.prunedm.compress_2to4.default, (dense,)),
        (torch.ops.prunedm.compress_2to4.default, (dense.bfloat16(),)),
        (torch.ops.prunedm.decompress_2to4.default, (values, meta)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_torch_compile_traces_cuda_ops_without_graph_breaks():
    def prune_and_pack(w):
        mask = torch.ops.prunedm.nm_mask(w, 2, 4)
        return torch.ops.prunedm.compress_2to4(w * mask)

    w = torch.randn(64, 128, dtype=torch.float16, device=DEVICE)
    compiled = torch.compile(prune_and_pack, fullgraph=True, backend="eager")
    values, meta = compiled(w)
    expected_values, expected_meta = prune_and_pack(w)
    assert torch.equal(values, expected_values) and torch.equal(meta, expected_meta)


# --- to_semi_structured against torch.sparse ------------------------------------------------------


def _cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


@pytest.mark.sm80
@pytest.mark.parametrize("shape", [(64, 128), (128, 256), (256, 64)])
def test_to_semi_structured_matmul_matches_torch_sparse(shape):
    major, _ = torch.cuda.get_device_capability()
    if major != 8 and not _cusparselt_available():
        pytest.skip("to_semi_structured needs cuSPARSELt on GPUs other than sm8x, and this torch has none")
    rows, cols = shape
    dense = random_2to4(rows, cols, torch.float16, seed=rows + cols).to(DEVICE)
    rhs = torch.randn(cols, 64, generator=torch.Generator().manual_seed(9)).half().to(DEVICE)
    ours = ops.to_semi_structured(dense)
    out = torch.mm(ours, rhs)
    assert out.shape == (rows, 64) and out.dtype == torch.float16
    exact = dense.float() @ rhs.float()
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=2e-2)
    if _cusparselt_available():
        theirs = torch.mm(torch.sparse.to_sparse_semi_structured(dense), rhs)
        torch.testing.assert_close(out, theirs, rtol=1e-2, atol=2e-2)
    if major == 8:
        from torch.sparse import SparseSemiStructuredTensorCUTLASS

        values, meta = ops.compress_2to4(dense, backend="extension")
        _assert_bitwise_equal(ours.packed, values)
        _assert_bitwise_equal(ours.meta, meta)
        cutlass = SparseSemiStructuredTensorCUTLASS.from_dense(dense)
        _assert_bitwise_equal(ours.packed, cutlass.packed)
        _assert_bitwise_equal(ours.meta, cutlass.meta)
        torch.testing.assert_close(out, torch.mm(cutlass, rhs), rtol=1e-2, atol=2e-2)


def test_to_semi_structured_refuses_dense_matrices():
    with pytest.raises(ValueError, match=r"dense is not 2:4 sparse"):
        ops.to_semi_structured(torch.ones(64, 64, dtype=torch.float16, device=DEVICE))


# --- Triton kernels against the CUDA kernels ------------------------------------------------------

TRITON_OPS = ("nm_mask", "nm_violations", "compress_2to4", "decompress_2to4")


def _triton_kernel(name: str):
    if not prunedm.extension_info()["triton"]["usable"]:
        pytest.skip("triton is not usable here: " + prunedm.extension_info()["triton"]["reason"])
    try:
        from prunedm import kernels
    except ImportError as exc:
        pytest.skip(f"prunedm.kernels does not import: {exc}")
    if not hasattr(kernels, name):
        pytest.skip(f"prunedm.kernels has no {name} yet")
    return getattr(kernels, name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_nm_mask_matches_cuda(dtype):
    _triton_kernel("nm_mask")
    for shape, (n, m) in [((7, 12), (2, 4)), ((33, 100), (1, 4)), ((5, 3, 64), (4, 8)), ((256, 1024), (2, 4))]:
        w = weights_with_ties(shape, dtype, seed=shape[-1]).to(DEVICE)
        assert torch.equal(ops.nm_mask(w, n, m, backend="triton"), ops.nm_mask(w, n, m, backend="extension"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.bool])
def test_triton_nm_violations_matches_cuda(dtype):
    _triton_kernel("nm_violations")
    t = (torch.rand(37, 48, generator=torch.Generator().manual_seed(1)) < 0.45).to(dtype).to(DEVICE)
    for n, m in [(2, 4), (1, 4), (3, 8)]:
        assert ops.nm_violations(t, n, m, backend="triton") == ops.nm_violations(t, n, m, backend="extension")


@pytest.mark.parametrize("dtype", SIXTEEN_BIT_DTYPES)
@pytest.mark.parametrize("shape", [(32, 32), (64, 160), (288, 96), (1024, 64)])
def test_triton_compress_and_decompress_match_cuda(shape, dtype):
    _triton_kernel("compress_2to4")
    _triton_kernel("decompress_2to4")
    dense = random_2to4(*shape, dtype, seed=shape[0] + shape[1]).to(DEVICE)
    values, meta = ops.compress_2to4(dense, backend="triton")
    cuda_values, cuda_meta = ops.compress_2to4(dense, backend="extension")
    _assert_bitwise_equal(values, cuda_values)
    _assert_bitwise_equal(meta, cuda_meta)
    _assert_bitwise_equal(
        ops.decompress_2to4(cuda_values, cuda_meta, backend="triton"),
        ops.decompress_2to4(cuda_values, cuda_meta, backend="extension"),
    )
