"""2:4 sparse linear and Conv2d with a fused epilogue (bias, activation, residual): the weight stays packed
as compress_2to4 makes it (values + sm80 metadata) and runs on mma.sp Sparse Tensor Cores on sm80+ GPUs."""

from __future__ import annotations

import torch

from prunedm import _ext
from prunedm.ops import _checks, _nvrtc, reference
from prunedm.ops._dispatch import BACKENDS

_CUDA_DTYPES = (torch.float16, torch.bfloat16)
CONV_CHANNEL_ALIGNMENT = 8  # the CUDA conv gathers 8 input channels (16 bytes) per cp.async
# "nvrtc": the CUDA kernel sources compiled at first use by NVRTC through cupy (prunedm.ops._nvrtc).
SPARSE_MM_BACKENDS = (*BACKENDS, "nvrtc")


def _ops_registered() -> bool:
    return _ext.extension_loaded() and hasattr(torch.ops.prunedm, "sparse_linear_2to4")


def _extension_problem(device: torch.device) -> str:
    """Why the compiled extension's kernels cannot run on `device` ("" when they can)."""
    if not _ext.extension_loaded():
        return _ext.extension_info()["cpu"]["reason"]
    if not _ops_registered():
        return "prunedm._C predates the sparse mm ops; rebuild it (pip install --no-build-isolation -e .)"
    if device.type == "cpu":
        return ""
    if device.type != "cuda":
        return f"no sparse kernels for {device.type} tensors"
    cuda = _ext.extension_info()["cuda"]
    return "" if cuda["usable"] else cuda["reason"]


def _nvrtc_problem(device: torch.device) -> str:
    """Why the NVRTC-compiled kernels (prunedm.ops._nvrtc) cannot run on `device` ("" when they can)."""
    if device.type != "cuda":
        return f"the nvrtc backend runs CUDA tensors, got {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    ok, reason, _ = _ext.nvrtc_status()
    return "" if ok else reason


def _cuda_call_problem(device: torch.device, dtype, conv_in_channels) -> str:
    """What the CUDA kernels (either build) refuse in this call ("" when nothing)."""
    major, minor = _nvrtc.device_capability(device)
    if major < 8:
        return f"mma.sp needs compute capability >= 8.0 (Sparse Tensor Cores), this GPU is {major}.{minor}"
    if dtype is not None and dtype not in _CUDA_DTYPES:
        return f"the CUDA sparse kernels take float16 or bfloat16, got {dtype}"
    if conv_in_channels is not None and conv_in_channels % CONV_CHANNEL_ALIGNMENT:
        return (
            f"the CUDA sparse conv needs Cin % {CONV_CHANNEL_ALIGNMENT} == 0 (16-byte channel gathers), "
            f"got Cin = {conv_in_channels}"
        )
    return ""


def sparse_kernel_backend(
    device, *, dtype: torch.dtype | None = None, conv_in_channels: int | None = None
) -> tuple[str | None, str]:
    """(backend, reason): which kernels sparse_linear_2to4 / sparse_conv2d_2to4 run on `device`, "extension"
    (prunedm._C: CUDA, or its C++ twin on CPU) or "nvrtc" (CUDA only: the same CUDA sources compiled at first
    use with NVRTC through cupy, used when _C was built without CUDA), or None with the reason."""
    device = torch.device(device)
    extension_problem = _extension_problem(device)
    if device.type != "cuda":
        return (None, extension_problem) if extension_problem else ("extension", "")
    backend = "extension"
    if extension_problem:
        nvrtc_problem = _nvrtc_problem(device)
        if nvrtc_problem:
            return None, f"{extension_problem}; and the NVRTC path cannot run: {nvrtc_problem}"
        backend = "nvrtc"
    call_problem = _cuda_call_problem(device, dtype, conv_in_channels)
    return (None, call_problem) if call_problem else (backend, "")


def sparse_kernels_available(device, *, dtype: torch.dtype | None = None, conv_in_channels: int | None = None):
    """(usable, reason): whether prunedm's sparse linear / conv kernels run on `device`.

    CUDA: the mma.sp kernels, from the extension built with CUDA or, without it, compiled at first use by
    NVRTC (cupy installed); they need compute capability >= 8.0 and float16/bfloat16 (`dtype`, when
    given); a conv also needs Cin % 8 == 0 (`conv_in_channels`, when given).
    CPU: the C++ twin of the kernels (for checking; slower than the reference's dense matmul).
    reason is "" when usable, else says what is missing. sparse_kernel_backend() also says which."""
    backend, reason = sparse_kernel_backend(device, dtype=dtype, conv_in_channels=conv_in_channels)
    return backend is not None, reason


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _choose(op: str, backend: str, input: torch.Tensor, needs_grad: bool, conv_in_channels=None) -> str:
    """ "reference", "extension" or "nvrtc" for this call; raises when an explicit choice cannot run."""
    if backend not in SPARSE_MM_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {SPARSE_MM_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        raise RuntimeError(
            f"{op}: there is no triton kernel for this op; use backend='extension', 'nvrtc' or 'reference'"
        )
    if needs_grad:
        if backend != "auto":
            raise RuntimeError(f"{op}: the {backend} kernels have no backward; use backend='reference' for autograd")
        return "reference"
    device = input.device
    if backend == "auto":
        # On CPU the reference (a dense MKL matmul) is faster than the C++ twin, which exists for checking.
        if device.type != "cuda":
            return "reference"
        chosen, _ = sparse_kernel_backend(device, dtype=input.dtype, conv_in_channels=conv_in_channels)
        return chosen or "reference"
    problem = _extension_problem(device) if backend == "extension" else _nvrtc_problem(device)
    if not problem and device.type == "cuda":
        problem = _cuda_call_problem(device, input.dtype, conv_in_channels)
    if problem:
        raise RuntimeError(f"{op}: the {backend} backend cannot run here: {problem}")
    return backend


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
    backend: "auto" (CUDA kernel when sparse_kernels_available, else the reference), "reference",
    "extension" (prunedm._C) or "nvrtc" (the CUDA sources compiled at first use through cupy; "auto" takes
    it when _C has no CUDA). The kernels have no backward: with autograd on, "auto" uses the reference."""
    _checks.check_sparse_linear(input, values, meta, bias, activation, residual)
    chosen = _choose("sparse_linear_2to4", backend, input, _needs_grad(input, values, bias, residual))
    if chosen == "extension":
        return torch.ops.prunedm.sparse_linear_2to4(input, values, meta, bias, activation, residual)
    if chosen == "nvrtc":
        return _nvrtc.sparse_linear_2to4(input, values, meta, bias, activation, residual)
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
    if chosen == "nvrtc":
        return _nvrtc.sparse_conv2d_2to4(
            input, values, meta, shape, bias, stride, padding, dilation, activation, residual
        )
    return reference.sparse_conv2d_2to4_ref(
        input, values, meta, shape, bias, stride, padding, dilation, activation, residual
    )
