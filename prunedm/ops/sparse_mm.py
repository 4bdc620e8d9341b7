"""2:4 sparse linear and Conv2d with a fused epilogue (bias, activation, residual): the weight stays packed
as compress_2to4 makes it (values + sm80 metadata) and runs on mma.sp Sparse Tensor Cores on sm80+ GPUs."""

from __future__ import annotations

import torch

from prunedm.ops import _backends, _checks, _nvrtc, reference
from prunedm.ops._backends import SPARSE_MM_BACKENDS
from prunedm.ops._checks import CONV_CHANNEL_ALIGNMENT  # noqa: F401  (prunedm.pruning.channels reads it here)

_KERNELS = ("extension", "nvrtc")


def _extension_problem(device: torch.device) -> str:
    """Why the compiled extension's kernels cannot run on `device` ("" when they can)."""
    problem = _backends.extension_problem(device)
    if problem or device.type != "cuda":
        return problem
    return "" if torch.cuda.is_available() else "no CUDA device is visible"


def _nvrtc_problem(device: torch.device) -> str:
    """Why the NVRTC-compiled kernels (prunedm.ops._nvrtc) cannot run on `device` ("" when they can)."""
    if device.type != "cuda":
        return f"the nvrtc backend runs CUDA tensors, got {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    ok, reason, _ = _backends.nvrtc_status()
    return "" if ok else reason


def _cuda_call_problem(device: torch.device, dtype, conv_in_channels) -> str:
    """What the CUDA kernels (either build) refuse in this call ("" when nothing)."""
    major, minor = _nvrtc.device_capability(device)
    if major < 8:
        return f"mma.sp needs compute capability >= 8.0 (Sparse Tensor Cores), this GPU is {major}.{minor}"
    if dtype is not None and dtype not in _checks.SIXTEEN_BIT_FLOATS:
        return f"the CUDA sparse kernels take float16 or bfloat16, got {dtype}"
    if conv_in_channels is not None and conv_in_channels % CONV_CHANNEL_ALIGNMENT:
        return (
            f"the CUDA sparse conv needs Cin % {CONV_CHANNEL_ALIGNMENT} == 0 (16-byte channel gathers), "
            f"got Cin = {conv_in_channels}"
        )
    return ""


def _kernel_problem(kernel: str, device: torch.device, dtype) -> str:
    """Why `kernel` ("extension" or "nvrtc") cannot run `dtype` tensors on `device` ("" when it can)."""
    problem = _extension_problem(device) if kernel == "extension" else _nvrtc_problem(device)
    if not problem and device.type == "cuda":
        problem = _cuda_call_problem(device, dtype, None)
    return problem


def _conv_extension(input, values, meta, shape, bias, stride, padding, dilation, activation, residual):
    return torch.ops.prunedm.sparse_conv2d_2to4(
        input, values, meta, list(shape), bias, list(stride), list(padding), list(dilation), activation, residual
    )


# On CPU "auto" takes the reference (a dense MKL matmul), faster than the C++ twin, which exists for checking.
_AUTO = {"cuda": (*_KERNELS, "reference"), "*": ("reference",)}
for _op, _ref, _ext_fn, _nvrtc_fn in (
    ("sparse_linear_2to4", reference.sparse_linear_2to4_ref, "sparse_linear_2to4", _nvrtc.sparse_linear_2to4),
    ("sparse_conv2d_2to4", reference.sparse_conv2d_2to4_ref, _conv_extension, _nvrtc.sparse_conv2d_2to4),
):
    _backends.declare(_op, reference=_ref, extension=_ext_fn, accepted=SPARSE_MM_BACKENDS, auto=_AUTO)
    _backends.register(_op, "nvrtc", _nvrtc_fn, available=lambda device, dtype: _kernel_problem("nvrtc", device, dtype))
    _backends.set_available(_op, "extension", lambda device, dtype: _kernel_problem("extension", device, dtype))


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


def choose(
    op: str, backend: str, input: torch.Tensor, needs_grad: bool, conv_in_channels: int | None = None
) -> _backends.Implementation:
    """The implementation op runs for this call (table lookups, cached); raises when an explicit choice cannot run."""
    _backends.check_backend(op, backend, SPARSE_MM_BACKENDS)
    device = input.device
    if backend == "triton":
        raise RuntimeError(
            f"{op}: there is no triton kernel for this op; use backend='extension', 'nvrtc' or 'reference'"
        )
    if needs_grad and backend not in ("auto", "reference"):
        raise RuntimeError(f"{op}: the {backend} kernels have no backward; use backend='reference' for autograd")
    if needs_grad:
        return _backends.resolve(op, "reference", device)
    impl = _backends.resolve(op, backend, device, input.dtype)
    if (
        conv_in_channels is not None
        and impl.name in _KERNELS
        and device.type == "cuda"
        and conv_in_channels % CONV_CHANNEL_ALIGNMENT
    ):
        if backend == "auto":
            return _backends.resolve(op, "reference", device)
        problem = _cuda_call_problem(device, None, conv_in_channels)
        raise RuntimeError(f"{op}: the {backend} backend cannot run here: {problem}")
    return impl


def _choose(op: str, backend: str, input: torch.Tensor, needs_grad: bool, conv_in_channels=None) -> str:
    """ "reference", "extension" or "nvrtc" for this call; raises when an explicit choice cannot run."""
    return choose(op, backend, input, needs_grad, conv_in_channels).name


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
    impl = choose("sparse_linear_2to4", backend, input, _needs_grad(input, values, bias, residual))
    return impl.fn(input, values, meta, bias, activation, residual)


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
    impl = choose("sparse_conv2d_2to4", backend, input, needs_grad, conv_in_channels=shape[1])
    return impl.fn(input, values, meta, shape, bias, stride, padding, dilation, activation, residual)
