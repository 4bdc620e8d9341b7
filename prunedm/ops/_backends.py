"""The one backend table: per op, its implementations with an availability check each, resolved once per
(op, backend, device, dtype) and cached, so a call pays one dict lookup for its backend choice.

One vocabulary (NAMES) for ops and layers. Implementations register here: the reference and the compiled
extension where each op is declared (prunedm.ops.*), the NVRTC kernels in prunedm.ops.sparse_mm, the Triton
kernels from prunedm.kernels itself (kernels -> ops, never ops -> kernels: the table loads that package by
name, as a plugin, the first time a Triton implementation is asked for)."""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, NamedTuple

import torch

from prunedm import _ext

NAMES = {
    "auto": "the first available implementation in the op's order (layers: timed per shape)",
    "reference": "prunedm.ops.reference: the spec, PyTorch code on any device",
    "extension": "prunedm._C: the compiled C++ (CPU) and CUDA kernels",
    "nvrtc": "the CUDA kernel sources compiled at first use by NVRTC through cupy (no nvcc needed)",
    "triton": "prunedm.kernels: Triton kernels (CPU tensors only under TRITON_INTERPRET=1)",
    "dense": "layers: the masked dense weight (decompressed per call, or cached with cache_dense=True)",
    "torch": "layers: torch.sparse's semi-structured 2:4 kernels (CUTLASS on sm8x, cuSPARSELt)",
    "prunedm": "layers: prunedm's own 2:4 kernels (extension, else nvrtc; on CPU the extension's C++ twin)",
}
# What each kind of caller accepts, in the order its errors list them.
OP_BACKENDS = ("auto", "reference", "extension", "triton")
SPARSE_MM_BACKENDS = (*OP_BACKENDS, "nvrtc")
LAYER_BACKENDS = ("auto", "dense", "torch", "prunedm")
# Implementations loaded by package name the first time they are asked for (they register on import).
PLUGINS = {"triton": "prunedm.kernels"}
# Default "auto" order per device type ("*": any other): Triton is taken on CUDA only (interpreted it is slow).
DEFAULT_AUTO = {"cuda": ("extension", "triton", "reference"), "cpu": ("extension", "reference")}


class Implementation(NamedTuple):
    name: str
    fn: Callable
    # Arguments an implementation refuses whatever the device (e.g. a Triton table too big): "auto" skips it.
    accepts: Callable[..., bool] | None = None


class _Op(NamedTuple):
    accepted: tuple[str, ...]
    auto: dict[str, tuple[str, ...]]
    implementations: dict[str, Callable]  # name -> fn, or a loader of it (extension ops: resolved once)
    available: dict[str, Callable[[torch.device, torch.dtype | None], str]]
    accepts: dict[str, Callable[..., bool]]


_OPS: dict[str, _Op] = {}
# (op, backend, device, dtype) -> Implementation, or the RuntimeError an explicit backend raises there.
_RESOLVED: dict[tuple, Implementation | RuntimeError] = {}


def extension_problem(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Why prunedm._C's kernels cannot run tensors on `device` ("" when they can)."""
    if device.type == "cpu":
        return _ext.extension_info()["cpu"]["reason"] if not _ext.extension_loaded() else ""
    if device.type == "cuda":
        return "" if _ext.cuda_kernels_built() else _ext.extension_info()["cuda"]["reason"]
    return f"no kernels for {device.type} tensors"


def triton_problem(device: torch.device, dtype: torch.dtype | None = None) -> str:
    return _ext.triton_usable_on(device)[1]


def reference_problem(device: torch.device, dtype: torch.dtype | None = None) -> str:
    return ""


_DEFAULT_AVAILABLE = {"reference": reference_problem, "extension": extension_problem, "triton": triton_problem}


def declare(
    op: str,
    *,
    reference: Callable,
    extension: str | Callable | None = None,
    accepted: tuple[str, ...] = OP_BACKENDS,
    auto: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Add op to the table with its reference and (by torch.ops.prunedm name, or a function) extension."""
    implementations = {"reference": reference}
    if extension is not None:
        implementations["extension"] = (
            (lambda: getattr(torch.ops.prunedm, extension)) if isinstance(extension, str) else (lambda: extension)
        )
    _OPS[op] = _Op(accepted, dict(auto or DEFAULT_AUTO), implementations, dict(_DEFAULT_AVAILABLE), {})
    clear_cache()


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    available: Callable[[torch.device, torch.dtype | None], str] | None = None,
    accepts: Callable[..., bool] | None = None,
) -> None:
    """Register `fn` as op's `backend` implementation (e.g. prunedm.kernels registering "triton")."""
    if op not in _OPS:
        raise KeyError(f"register: unknown op {op!r}; declared ops: {sorted(_OPS)}")
    if backend not in _OPS[op].accepted:
        raise ValueError(f"register: {op} does not take backend {backend!r} (it takes {_OPS[op].accepted})")
    entry = _OPS[op]
    entry.implementations[backend] = fn
    if available is not None:
        entry.available[backend] = available
    if accepts is not None:
        entry.accepts[backend] = accepts
    clear_cache()


def set_available(op: str, backend: str, available: Callable[[torch.device, torch.dtype | None], str]) -> None:
    _OPS[op].available[backend] = available
    clear_cache()


@contextlib.contextmanager
def replaced(op: str, backend: str, fn: Callable):
    """Within the block, op's `backend` implementation is `fn` (benchmarks stub a kernel out with it)."""
    implementations = _OPS[op].implementations
    saved = implementations.get(backend)
    implementations[backend] = (lambda: fn) if backend == "extension" else fn
    clear_cache()
    try:
        yield
    finally:
        if saved is None:
            implementations.pop(backend, None)
        else:
            implementations[backend] = saved
        clear_cache()


def clear_cache() -> None:
    """Forget every resolution (after a registration; tests that fake the environment call it too)."""
    _RESOLVED.clear()


def check_backend(where: str, backend: str, accepted: tuple[str, ...]) -> str:
    """`backend` when it is in `accepted`, else the one ValueError naming them."""
    if backend not in accepted:
        raise ValueError(f"{where}: backend must be one of {accepted}, got {backend!r}")
    return backend


def _load_plugin(backend: str) -> str:
    """Import the package that registers `backend` ("" when loaded, else why it cannot be)."""
    name = PLUGINS.get(backend)
    if name is None:
        return ""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        return f"{name} cannot be imported ({exc})"
    return ""


def problem(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Why op's `backend` implementation cannot run on `device` / `dtype` ("" when it can)."""
    entry = _OPS[op]
    reason = entry.available.get(backend, reference_problem)(device, dtype)
    if reason:
        return reason
    if backend not in entry.implementations:
        reason = _load_plugin(backend)
        if not reason and backend not in entry.implementations:
            reason = f"there is no {backend} kernel for {op}"
    return reason


def _implementation(op: str, backend: str) -> Implementation:
    entry = _OPS[op]
    fn = entry.implementations[backend]
    if backend == "extension":
        fn = fn()  # the torch.ops.prunedm op, looked up once
    return Implementation(backend, fn, entry.accepts.get(backend))


def _resolve_uncached(op: str, backend: str, device: torch.device, dtype) -> Implementation | RuntimeError:
    entry = _OPS[op]
    if backend != "auto":
        reason = problem(op, backend, device, dtype)
        if reason:
            return RuntimeError(f"{op}: the {backend} backend cannot run here: {reason}")
        return _implementation(op, backend)
    for name in entry.auto.get(device.type, entry.auto.get("*", ("reference",))):
        if not problem(op, name, device, dtype):
            return _implementation(op, name)
    return _implementation(op, "reference")


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> Implementation:
    """The implementation op runs for `backend` on `device` / `dtype`, resolved once and cached.

    ValueError for a name op does not take; RuntimeError when an explicit backend cannot run there."""
    key = (op, backend, device, dtype)
    found = _RESOLVED.get(key)
    if found is None:
        check_backend(op, backend, _OPS[op].accepted)
        found = _RESOLVED[key] = _resolve_uncached(op, backend, device, dtype)
    if isinstance(found, RuntimeError):
        raise RuntimeError(*found.args)
    return found


def pick(op: str, backend: str, tensor: torch.Tensor) -> Implementation:
    """resolve() for `tensor`'s device (the generic ops run every dtype they accept on each backend)."""
    return resolve(op, backend, tensor.device)


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listed}")


# -- what is built and usable here ----------------------------------------------------------------------------

# (importable, reason when not, cupy version) of the NVRTC path, filled once by nvrtc_status().
_NVRTC_STATUS: tuple[bool, str, str] | None = None


def nvrtc_status() -> tuple[bool, str, str]:
    """(usable in principle, reason when not, cupy version) of the no-nvcc path: the CUDA kernel sources
    compiled at first use with NVRTC through cupy (prunedm.ops._nvrtc). Checked once per process."""
    global _NVRTC_STATUS
    if _NVRTC_STATUS is None:
        from prunedm.ops import _nvrtc

        _NVRTC_STATUS = _nvrtc.status()
    return _NVRTC_STATUS


def _cuda_kernels_path(cuda: dict, cuda_device: bool) -> tuple[str, str]:
    """Which CUDA kernels the sparse ops use here ("extension", "nvrtc (cupy X.Y)" or "none") and why not
    usable (empty when they are)."""
    if cuda["built"]:
        return "extension", cuda["reason"]
    ok, reason, version = nvrtc_status()
    if ok:
        short = ".".join(version.split(".")[:2])
        return f"nvrtc (cupy {short})", "" if cuda_device else "no CUDA device is visible"
    return "none", f"{cuda['reason']}; and the NVRTC path is unavailable: {reason}"


def extension_info() -> dict:
    """Which backends (cpu, cuda, triton) are built and usable here, and why not.

    Returns {"cpu": {...}, "cuda": {...}, "triton": {...}, "torch": version, ...}; each backend
    entry has "built" and "usable" (bools) and "reason" (empty when usable). "cuda_kernels" says which
    CUDA sparse kernels run: "extension" (prunedm._C), "nvrtc (cupy X.Y)" (compiled at first use, when
    _C has no CUDA and cupy is installed) or "none"; "cuda_kernels_reason" says why they cannot run
    here (empty when they can). Builds the report anew (device name, probes): not for a hot path."""
    info = _ext.extension_info()
    info["cuda_kernels"], info["cuda_kernels_reason"] = _cuda_kernels_path(info["cuda"], torch.cuda.is_available())
    return info


# The compiled ops' fake (meta) implementations, once the extension's schemas exist (prunedm._ext checked them).
if _ext.extension_loaded():
    from prunedm.ops import _fake  # noqa: F401
