"""2:4 sparse linear and Conv2d with a fused epilogue (bias, activation, residual): the weight stays packed
as compress_2to4 makes it (values + sm80 metadata) and runs on mma.sp Sparse Tensor Cores on sm80+ GPUs."""

from __future__ import annotations

import torch

from prunedm import _ext
from prunedm.ops import _checks, reference
from prunedm.ops._dispatch import BACKENDS

_CUDA_DTYPES = (torch.float16, torch.bfloat16)
CONV_CHANNEL_ALIGNMENT = 8  # the CUDA conv gathers 8 input channels (16 bytes) per cp.async


def _ops_registered() -> bool:
    return _ext.extension_loaded() and hasattr(torch.ops.prunedm, "sparse_linear_2to4")


def sparse_kernels_available(device, *, dtype: torch.dtype | None = None, conv_in_channels: int | None = None):
    """(usable, reason): whether torch.ops.prunedm.sparse_linear_2to4 / sparse_conv2d_2to4 run on `device`.

    CUDA: the mma.sp kernels, which need the extension built with CUDA, compute capability >= 8.0, and
    float16/bfloat16 (`dtype`, when given); a conv also needs Cin % 8 == 0 (`conv_in_channels`, when given).
    CPU: the C++ twin of the kernels (for checking; slower than the reference's dense matmul).
    reason is "" when usable, else says what is missing."""
    device = torch.device(device)
    if not _ext.extension_loaded():
        return False, _ext.extension_info()["cpu"]["reason"]
    if not _ops_registered():
        return False, "prunedm._C predates the sparse mm ops; rebuild it (pip install --no-build-isolation -e .)"
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"no sparse kernels for {device.type} tensors"
    cuda = _ext.extension_info()["cuda"]
    if not cuda["usable"]:
        return False, cuda["reason"]
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"mma.sp needs compute capability >= 8.0 (Sparse Tensor Cores), this GPU is {major}.{minor}"
    if dtype is not None and dtype not in _CUDA_DTYPES:
        return False, f"the CUDA sparse kernels take float16 or bfloat16, got {dtype}"
    if conv_in_channels is not None and conv_in_channels % CONV_CHANNEL_ALIGNMENT:
        return False, (
            f"the CUDA sparse conv needs Cin % {CONV_CHANNEL_ALIGNMENT} == 0 (16-byte channel gathers), "
            f"got Cin = {conv_in_channels}"
        )
    return True, ""


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _choose(op: str, backend: str, input: torch.Tensor, needs_grad: bool, conv_in_channels=None) -> str:
    """ "reference" or "extension" for this call; raises when an explicit choice cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        raise RuntimeError(f"{op}: there is no triton kernel for this op; use backend='extension' or 'reference'")
    if needs_grad:
        if backend == "extension":
            raise RuntimeError(f"{op}: the extension kernels have no backward; use backend='reference' for autograd")
        return "reference"
    usable, reason = sparse_kernels_available(input.device, dtype=input.dtype, conv_in_channels=conv_in_channels)
    if backend == "auto":
        # On CPU the reference (a dense MKL matmul) is faster than the C++ twin, which exists for checking.
        return "extension" if usable and input.device.type == "cuda" else "reference"
    if not usable:
        raise RuntimeError(f"{op}: the extension backend cannot run here: {reason}")
    return "extension"


def sparse_linear_2to4(
    input: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """act(input @ W.T + bias) + residual with W = decompress_2to4(values, meta) of shape [out, K].

    input [..., K] (float16, bfloat16 or float32; values, bias and residual in the same dtype); values
    [out, K/2] and meta [out, K/16] int16 from compress_2to4 (out and K multiples of 32); bias [out];
    residual broadcastable to the output [..., out]; activation one of "none", "relu", "silu", "gelu",
    "gelu_tanh". 16-bit inputs accumulate in float32 and round once.
    backend: "auto" (CUDA kernel when sparse_kernels_available, else the reference), "reference" or
    "extension". The kernels have no backward: with autograd on, "auto" uses the reference."""
    _checks.check_sparse_linear(input, values, meta, bias, activation, residual)
    chosen = _choose("sparse_linear_2to4", backend, input, _needs_grad(input, values, bias, residual))
    if chosen == "extension":
        return torch.ops.prunedm.sparse_linear_2to4(input, values, meta, bias, activation, residual)
    return reference.sparse_linear_2to4_ref(input, values, meta, bias, activation, residual)


def sparse_conv2d_2to4(
    input: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    weight_shape,
    bias: torch.Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """act(conv2d(input, W, bias, stride, padding, dilation)) + residual, groups=1, with
    W = matrix_to_conv_weight(decompress_2to4(values, meta), weight_shape).

    values/meta pack the [Cout, kh*kw*Cin] matrix of conv_weight_to_matrix (K in (kh, kw, Cin) order, 2:4
    along K); weight_shape = (Cout, Cin, kh, kw). input [N, Cin, H, W], NCHW or channels_last (the output
    follows the input's memory format); stride, padding, dilation: an int or an (h, w) pair. bias, residual,
    activation and backend as in sparse_linear_2to4. The CUDA kernel needs Cin % 8 == 0 ("auto" falls back
    to the reference otherwise)."""
    shape, stride, padding, dilation, _ = _checks.check_sparse_conv(
        input, values, meta, weight_shape, bias, stride, padding, dilation, activation, residual
    )
    needs_grad = _needs_grad(input, values, bias, residual)
    chosen = _choose("sparse_conv2d_2to4", backend, input, needs_grad, conv_in_channels=shape[1])
    if chosen == "extension":
        return torch.ops.prunedm.sparse_conv2d_2to4(
            input, values, meta, list(shape), bias, list(stride), list(padding), list(dilation), activation, residual
        )
    return reference.sparse_conv2d_2to4_ref(
        input, values, meta, shape, bias, stride, padding, dilation, activation, residual
    )
