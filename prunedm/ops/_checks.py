"""Argument checks of the public ops, shared by every backend so that errors read the same.

They mirror csrc/common/checks.h: ValueError for a wrong shape or value, TypeError for a wrong dtype."""

from __future__ import annotations

import torch

from prunedm.ops.reference import ACTIVATIONS, ROW_TILE

MAX_GROUP_SIZE = 64
COL_TILE = 32
# The dtypes of 2:4 compression and of the CUDA sparse kernels (the one home of this list).
SIXTEEN_BIT_FLOATS = (torch.float16, torch.bfloat16)
CONV_CHANNEL_ALIGNMENT = 8  # the CUDA conv gathers 8 input channels (16 bytes) per cp.async


def check_tensor(op: str, arg: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")


def check_nm(op: str, n, m) -> None:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if not 1 <= m <= MAX_GROUP_SIZE:
        raise ValueError(f"{op}: m must be in [1, {MAX_GROUP_SIZE}], got {m}")
    if not 0 <= n <= m:
        raise ValueError(f"{op}: n must be in [0, m] = [0, {m}], got {n}")


def check_last_dim_groups(op: str, arg: str, t: torch.Tensor, m: int) -> None:
    if t.dim() < 1:
        raise ValueError(f"{op}: {arg} must have at least 1 dimension, got a 0-D tensor")
    if t.shape[-1] % m != 0:
        raise ValueError(f"{op}: the last dim of {arg} ({t.shape[-1]}) must be divisible by m = {m}")


def check_nm_mask(weight, n, m) -> None:
    check_tensor("nm_mask", "weight", weight)
    check_nm("nm_mask", n, m)
    if not weight.is_floating_point():
        raise TypeError(f"nm_mask: weight must be a floating-point tensor, got {weight.dtype}")
    check_last_dim_groups("nm_mask", "weight", weight, m)


def check_nm_violations(op: str, t, n, m) -> None:
    check_tensor(op, "t", t)
    check_nm(op, n, m)
    if t.is_complex():
        raise TypeError(f"{op}: t must be real, got {t.dtype}")
    check_last_dim_groups(op, "t", t, m)


def check_16bit_float(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in SIXTEEN_BIT_FLOATS:
        raise TypeError(f"{op}: {arg} must be float16 or bfloat16, got {t.dtype}")


def check_compress(dense) -> None:
    check_tensor("compress_2to4", "dense", dense)
    if dense.dim() != 2:
        raise ValueError(f"compress_2to4: dense must be 2-D, got {dense.dim()}-D")
    check_16bit_float("compress_2to4", "dense", dense)
    rows, cols = dense.shape
    if rows % ROW_TILE or cols % COL_TILE:
        raise ValueError(
            f"compress_2to4: dense's rows and columns must be multiples of {ROW_TILE} and {COL_TILE}, "
            f"got {list(dense.shape)}"
        )


def violation_error(dense: torch.Tensor, count: int) -> ValueError:
    """The error compress_2to4 raises for a matrix that is not 2:4 sparse."""
    over = ((dense != 0).reshape(dense.shape[0], -1, 4).sum(-1) > 2).nonzero()
    row, group = (int(v) for v in over[0]) if len(over) else (-1, -1)
    return ValueError(
        f"compress_2to4: dense is not 2:4 sparse: {count} group(s) of 4 along a row hold more than 2 non-zeros "
        f"(the first at row {row}, columns {4 * group}..{4 * group + 3}); prune it first, "
        "e.g. dense * prunedm.ops.nm_mask(dense)"
    )


def check_decompress(values, meta) -> None:
    check_tensor("decompress_2to4", "values", values)
    check_tensor("decompress_2to4", "meta", meta)
    if values.dim() != 2:
        raise ValueError(f"decompress_2to4: values must be 2-D, got {values.dim()}-D")
    check_16bit_float("decompress_2to4", "values", values)
    if meta.dtype != torch.int16:
        raise TypeError(f"decompress_2to4: meta must be int16, got {meta.dtype}")
    if values.device != meta.device:
        raise ValueError(
            f"decompress_2to4: values and meta must be on one device, got {values.device} and {meta.device}"
        )
    rows, cols = values.shape[0], 2 * values.shape[1]
    if rows % ROW_TILE or cols % COL_TILE:
        raise ValueError(
            f"decompress_2to4: values must be [R, C/2] with R a multiple of {ROW_TILE} and C of {COL_TILE}, "
            f"got {list(values.shape)}"
        )
    if meta.dim() != 2 or list(meta.shape) != [rows, cols // 16]:
        raise ValueError(
            f"decompress_2to4: meta must be [{rows}, {cols // 16}] for values of shape {list(values.shape)}, "
            f"got {list(meta.shape)}"
        )


def invalid_meta_error(count: int) -> ValueError:
    return ValueError(
        f"decompress_2to4: meta holds {count} invalid 2:4 index pair(s) (each 4-bit entry must name two "
        "increasing indices); was it made by compress_2to4 for values of this shape?"
    )


def check_conv_weight(w) -> None:
    check_tensor("conv_weight_to_matrix", "w", w)
    if w.dim() != 4:
        raise ValueError(f"conv_weight_to_matrix: w must be 4-D [Cout, Cin, kh, kw], got {w.dim()}-D")


def check_conv_matrix(mat, shape) -> tuple[int, int, int, int]:
    check_tensor("matrix_to_conv_weight", "mat", mat)
    shape = tuple(shape)
    if len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"matrix_to_conv_weight: shape must be 4 positive ints (Cout, Cin, kh, kw), got {shape}")
    cout, cin, kh, kw = shape
    if mat.dim() != 2 or tuple(mat.shape) != (cout, kh * kw * cin):
        raise ValueError(
            f"matrix_to_conv_weight: mat must be [Cout, kh*kw*Cin] = [{cout}, {kh * kw * cin}] for shape {shape}, "
            f"got {list(mat.shape)}"
        )
    return shape


# Gumbel N:M sampling (mirrors check_gumbel_* in csrc/cpu/gumbel.cpp)

MAX_PATTERN_GROUP_SIZE = 16  # gumbel_pattern_sample: C(16, 8) = 12870 candidate patterns per group
GUMBEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_RANGE = (-(2**63), 2**63 - 1)


def check_tau(op: str, tau) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{op}: tau must be a float, got {type(tau).__name__}")
    if not (0 < tau < float("inf")):
        raise ValueError(f"{op}: tau must be a finite number > 0, got {tau}")


def check_seed(op: str, seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int or None, got {type(seed).__name__}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{op}: seed must fit in 64 signed bits, got {seed}")


def check_offset(op: str, offset) -> None:
    """The Gumbel ops' offset: the flat index of the input's first element in the tensor whose noise it draws."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{op}: offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset <= SEED_RANGE[1]:
        raise ValueError(f"{op}: offset must be in [0, 2^63) (the flat index of the first element), got {offset}")


def _check_gumbel_input(op: str, arg: str, t, hard) -> None:
    check_tensor(op, arg, t)
    if t.dtype not in GUMBEL_DTYPES:
        raise TypeError(f"{op}: {arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not isinstance(hard, bool):
        raise TypeError(f"{op}: hard must be a bool, got {type(hard).__name__}")


def _is_traced(t: torch.Tensor) -> bool:
    """Whether t has no values to read: under torch.compile tracing, a fake tensor, or CUDA graph capture."""
    if torch.compiler.is_compiling() or type(t).__name__ == "FakeTensor":
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_no_nan(op: str, arg: str, t: torch.Tensor) -> None:
    """NaN has no place in a ranking: +-inf are the extremes the samplers define, NaN is refused. Reads one
    bool back (skipped while tracing or capturing, where the kernels assume no NaN)."""
    if t.numel() == 0 or _is_traced(t):
        return
    # amax propagates NaN: one reduction without a mask-sized temporary, 4x faster than isnan().any().
    if bool(torch.isnan(t.detach().amax())):
        nan = torch.isnan(t.detach())
        first = [int(i) for i in nan.nonzero()[0]]
        raise ValueError(
            f"{op}: {arg} holds {int(nan.sum())} NaN value(s) (the first at index {first}); "
            f"{arg} must hold numbers or +-inf (see the op's docstring for what +-inf mean)"
        )


def check_gumbel_nm(logits, n, m, tau, hard, seed) -> None:
    op = "gumbel_nm_sample"
    _check_gumbel_input(op, "logits", logits, hard)
    check_nm(op, n, m)
    check_last_dim_groups(op, "logits", logits, m)
    check_tau(op, tau)
    check_seed(op, seed)
    check_no_nan(op, "logits", logits)


def num_patterns(n: int, m: int) -> int:
    import math

    return math.comb(m, n)


def check_gumbel_pattern(pattern_logits, n, m, tau, hard, seed) -> None:
    op = "gumbel_pattern_sample"
    _check_gumbel_input(op, "pattern_logits", pattern_logits, hard)
    check_nm(op, n, m)
    if m > MAX_PATTERN_GROUP_SIZE:
        raise ValueError(f"{op}: m must be in [1, {MAX_PATTERN_GROUP_SIZE}] (C(m, n) candidate patterns per group), "
                         f"got {m}")  # fmt: skip
    patterns = num_patterns(n, m)
    if pattern_logits.dim() < 2 or pattern_logits.shape[-1] != patterns:
        raise ValueError(
            f"{op}: pattern_logits must be [..., G, C(m, n)] = [..., G, {patterns}] for n = {n}, m = {m}, "
            f"got {list(pattern_logits.shape)}"
        )
    check_tau(op, tau)
    check_seed(op, seed)
    check_no_nan(op, "pattern_logits", pattern_logits)


# 2:4 sparse linear / conv (mirrors check_sparse_* in csrc/common/checks.h)

SPARSE_MM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_activation(op: str, activation) -> None:
    if not isinstance(activation, str):
        raise TypeError(f"{op}: activation must be a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_like_input(op: str, arg: str, t, input: torch.Tensor) -> None:
    check_tensor(op, arg, t)
    if t.dtype != input.dtype:
        raise TypeError(f"{op}: {arg} must have input's dtype ({input.dtype}), got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{op}: {arg} must be on input's device ({input.device}), got {t.device}")


def check_sparse_weight(op: str, input, values, meta) -> tuple[int, int]:
    """values [out, K/2] in input's dtype, meta [out, K/16] int16, out % 32 == 0, K % 32 == 0; returns (out, K)."""
    check_tensor(op, "input", input)
    if input.dtype not in SPARSE_MM_DTYPES:
        raise TypeError(f"{op}: input must be float16, bfloat16 or float32, got {input.dtype}")
    _check_like_input(op, "values", values, input)
    check_tensor(op, "meta", meta)
    if meta.dtype != torch.int16:
        raise TypeError(f"{op}: meta must be int16, got {meta.dtype}")
    if meta.device != input.device:
        raise ValueError(f"{op}: meta must be on input's device ({input.device}), got {meta.device}")
    if values.dim() != 2:
        raise ValueError(f"{op}: values must be 2-D [out, K/2], got {values.dim()}-D")
    rows, k = values.shape[0], 2 * values.shape[1]
    if rows % ROW_TILE or k % COL_TILE or rows == 0 or k == 0:
        raise ValueError(
            f"{op}: values must be [out, K/2] with out a positive multiple of {ROW_TILE} and K of {COL_TILE}, "
            f"got {list(values.shape)}"
        )
    if meta.dim() != 2 or tuple(meta.shape) != (rows, k // 16):
        raise ValueError(
            f"{op}: meta must be [{rows}, {k // 16}] for values of shape {list(values.shape)}, got {list(meta.shape)}"
        )
    return rows, k


def _check_bias(op: str, bias, input: torch.Tensor, rows: int) -> None:
    if bias is None:
        return
    _check_like_input(op, "bias", bias, input)
    if bias.dim() != 1 or bias.shape[0] != rows:
        raise ValueError(f"{op}: bias must be [{rows}], got {list(bias.shape)}")


def _check_residual(op: str, residual, input: torch.Tensor, out_shape) -> None:
    if residual is None:
        return
    _check_like_input(op, "residual", residual, input)
    out_shape = list(out_shape)
    ok = residual.dim() <= len(out_shape) and all(
        r in (o, 1) for r, o in zip(reversed(residual.shape), reversed(out_shape))
    )
    if not ok:
        raise ValueError(
            f"{op}: residual of shape {list(residual.shape)} does not broadcast to the output's shape {out_shape}"
        )


def check_sparse_linear(input, values, meta, bias, activation, residual) -> tuple[int, int]:
    """Checks sparse_linear_2to4's arguments; returns (out, K)."""
    op = "sparse_linear_2to4"
    rows, k = check_sparse_weight(op, input, values, meta)
    if input.dim() < 1 or input.shape[-1] != k:
        raise ValueError(f"{op}: input must be [..., {k}] (K = 2 * values.shape[1]), got {list(input.shape)}")
    _check_bias(op, bias, input, rows)
    _check_residual(op, residual, input, [*input.shape[:-1], rows])
    check_activation(op, activation)
    return rows, k


def conv_pair(op: str, arg: str, v, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (h, w), each >= minimum, as a tuple."""
    if isinstance(v, int) and not isinstance(v, bool):
        pair = (v, v)
    else:
        pair = tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
        raise TypeError(f"{op}: {arg} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{op}: {arg} must be >= {minimum}, got {v!r}")
    return pair


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    """Output size of one spatial dim as torch computes it; 0 when the dilated kernel does not fit."""
    span = size + 2 * pad - dil * (kernel - 1) - 1
    return 0 if span < 0 else span // stride + 1


def check_sparse_conv(input, values, meta, weight_shape, bias, stride, padding, dilation, activation, residual):
    """Checks sparse_conv2d_2to4's arguments; returns (weight_shape, stride, padding, dilation, out_hw) as tuples."""
    op = "sparse_conv2d_2to4"
    rows, k = check_sparse_weight(op, input, values, meta)
    shape = tuple(weight_shape) if isinstance(weight_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{op}: weight_shape must be 4 positive ints (Cout, Cin, kh, kw), got {weight_shape!r}")
    cout, cin, kh, kw = shape
    if cout != rows or cin * kh * kw != k:
        raise ValueError(
            f"{op}: weight_shape {shape} does not match values of shape {list(values.shape)} "
            f"(needs Cout = {rows} and Cin*kh*kw = K = {k})"
        )
    if input.dim() != 4 or input.shape[1] != cin:
        raise ValueError(f"{op}: input must be [N, Cin, H, W] with Cin = {cin}, got {list(input.shape)}")
    stride = conv_pair(op, "stride", stride, 1)
    padding = conv_pair(op, "padding", padding, 0)
    dilation = conv_pair(op, "dilation", dilation, 1)
    out_hw = tuple(
        conv_out_size(input.shape[2 + i], shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2)
    )
    if min(out_hw) <= 0:
        raise ValueError(
            f"{op}: the (dilated) kernel {shape[2:]} does not fit the padded input {list(input.shape[2:])}"
        )
    _check_bias(op, bias, input, rows)
    _check_residual(op, residual, input, [input.shape[0], rows, *out_hw])
    check_activation(op, activation)
    return shape, stride, padding, dilation, out_hw
