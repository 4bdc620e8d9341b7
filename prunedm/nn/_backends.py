"""Which forward path a sparse layer can take on a device, and the torch.sparse weight the `torch` backend runs.

Backends: "dense" (decompress to the masked dense weight per call: the reference and the CPU path),
"torch" (torch.sparse semi-structured: CUTLASS on sm8x, cuSPARSELt elsewhere), "prunedm" (prunedm's
own mma.sp kernels, prunedm.ops.sparse_linear_2to4 / sparse_conv2d_2to4) and "auto" (timed per shape)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from prunedm import ops
from prunedm.nn import _packing
from prunedm.ops._backends import LAYER_BACKENDS as BACKENDS
from prunedm.ops._checks import SIXTEEN_BIT_FLOATS as SPARSE_KERNEL_DTYPES

# torch's CUTLASS tensor needs the sparse matrix's columns in multiples of 64 for 16-bit dtypes.
CUTLASS_COL_MULTIPLE = 64


class SparseFallbackWarning(UserWarning):
    """A sparse layer runs its masked dense weight because no sparse kernel can run it here."""


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning per process and key (e.g. one for "no Sparse Tensor Cores", not one per layer)."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, SparseFallbackWarning, stacklevel=4)


def check_backend(backend: str) -> str:
    """`backend` when it is one of BACKENDS, else ValueError naming them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def prunedm_backend_problem(
    device: torch.device, dtype: torch.dtype, conv_in_channels: int | None = None
) -> tuple[str, str] | None:
    """(warning key, reason) when prunedm's own 2:4 kernels cannot run weights of `dtype` on `device`.

    On CPU they run the extension's CPU twin of the CUDA kernel (exact, not fast): usable for tests
    and for backend="prunedm", never picked by "auto"."""
    if device.type == "cpu":
        return None
    try:
        usable, reason = ops.sparse_kernels_available(device, dtype=dtype, conv_in_channels=conv_in_channels)
    except (RuntimeError, ValueError, TypeError) as exc:
        usable, reason = False, f"sparse_kernels_available raised {type(exc).__name__}: {exc}"
    if not usable:
        return "prunedm-unavailable", f"prunedm's sparse kernels cannot run on {device}: {reason}"
    if dtype not in SPARSE_KERNEL_DTYPES:
        return f"dtype-{dtype}", (
            f"{str(dtype).removeprefix('torch.')} weights: 2:4 sparse kernels run float16/bfloat16; "
            "convert the model with .half() or .to(torch.bfloat16)"
        )
    return _quarantine_problem(device, conv_in_channels)


def _quarantine_problem(device: torch.device, conv_in_channels: int | None) -> tuple[str, str] | None:
    """(key, reason) when the kernel failed its self-test on this GPU (prunedm.nn._selftest, run on first use
    in a child process); warned once here, so that "auto" (which then runs torch or dense) names it too."""
    from prunedm.nn import _selftest

    try:
        implementation, _ = ops.sparse_kernel_backend(device)
    except (RuntimeError, ValueError, TypeError):
        return None
    if implementation is None:
        return None
    kernel = "sparse_conv2d_2to4" if conv_in_channels is not None else "sparse_linear_2to4"
    problem = _selftest.quarantine_problem(kernel, implementation, device)
    if problem is not None:
        warn_once(*problem)
    return problem


def torch_backend_problem(device: torch.device, dtype: torch.dtype) -> tuple[str, str] | None:
    """(warning key, reason) when torch.sparse's 2:4 kernels cannot run weights of `dtype` on `device`."""
    if device.type != "cuda":
        return "torch-not-cuda", (f"no 2:4 sparse kernel on {device.type}: masked dense weight, decompressed per call")
    if torch.version.hip is not None:
        return "torch-rocm", "torch.sparse's 2:4 kernels are not supported on ROCm by prunedm yet"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        name = torch.cuda.get_device_name(device)
        return "no-sparse-tensor-cores", (
            f"{name} (sm_{major}{minor}) has no Sparse Tensor Cores (2:4 needs compute capability 8.0 or newer)"
        )
    if dtype not in SPARSE_KERNEL_DTYPES:
        return f"dtype-{dtype}", (
            f"{str(dtype).removeprefix('torch.')} weights: 2:4 sparse kernels run float16/bfloat16; "
            "convert the model with .half() or .to(torch.bfloat16)"
        )
    if major != 8 and not torch.backends.cusparselt.is_available():
        return "no-cusparselt", (
            f"sm_{major}{minor}: torch's CUTLASS 2:4 kernels run on sm8x only and this torch build has no cuSPARSELt"
        )
    return None


def build_semi_structured(
    values: torch.Tensor, meta: torch.Tensor, rows: int, cols: int
) -> tuple[torch.Tensor, int, int, int]:
    """torch's SparseSemiStructuredTensor for a packed [rows, cols] matrix.

    Returns (tensor, its rows, its cols, extra bytes it holds beyond values + meta). On sm8x with
    columns in multiples of 64 it wraps our buffers as they are (CUTLASS layout, no extra memory);
    otherwise the padded dense matrix is rebuilt once, temporarily, and handed to
    prunedm.ops.to_semi_structured (cuSPARSELt on sm90+, whose packed format is its own)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    rows_p, cols_p = values.shape[0], values.shape[1] * 2
    major, _ = torch.cuda.get_device_capability(values.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype")
        if major == 8 and cols_p % CUTLASS_COL_MULTIPLE == 0:
            tensor = SparseSemiStructuredTensorCUTLASS(
                torch.Size([rows_p, cols_p]),
                packed=values,
                meta=meta,
                packed_t=None,
                meta_t=None,
                compressed_swizzled_bitmask=None,
                requires_grad=False,
            )
            return tensor, rows_p, cols_p, 0
        dense = _packing.unpack(values, meta, rows_p, cols_p)
        if major == 8:
            cols_p = _packing.round_up(cols_p, CUTLASS_COL_MULTIPLE)
            dense = F.pad(dense, (0, cols_p - dense.shape[1]))
        tensor = ops.to_semi_structured(dense.contiguous())
        del dense
    extra = sum(t.numel() * t.element_size() for t in (tensor.packed, tensor.meta) if t is not None)
    return tensor, rows_p, cols_p, extra


def autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
