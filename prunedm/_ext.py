"""Loads the compiled extension prunedm._C defensively and reports which backends are usable.

`import prunedm` never fails for want of the extension: every op has a reference path, and
extension_info() says what was built, what can run here, and how to get what is missing."""

from __future__ import annotations

import importlib.util
import os

import torch

_BUILD_HINT = (
    "the ops run their PyTorch reference code meanwhile; build it with `pip install --no-build-isolation -e .` "
    "(or `make build`) in the repository, or install prunedm with pip"
)
_REBUILD_HINT = (
    "reinstall from source with `pip install --no-build-isolation -e .` (or `make build`) against the torch you run"
)


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


# (module, error): filled once by _load(). A plain global rather than functools.lru_cache, so that
# torch.compile can trace the ops' backend choice without a graph break.
_LOADED: tuple[object | None, str] | None = None


def _load() -> tuple[object | None, str]:
    global _LOADED
    if _LOADED is None:
        # Absent is not broken: `from prunedm import _C` on a source tree without the built file would
        # report a "partially initialized module ... circular import", which hides the plain cause.
        try:
            absent = importlib.util.find_spec("prunedm._C") is None
        except ImportError:  # a finder that refuses it: report it as failing to import, below
            absent = False
        if absent:
            _LOADED = (None, f"prunedm._C is not built (no compiled extension beside {_package_dir()}); {_BUILD_HINT}")
            return _LOADED
        try:
            from prunedm import _C  # noqa: F401  (importing registers torch.ops.prunedm.*)
        except ImportError as exc:
            _LOADED = (None, f"prunedm._C failed to import ({exc}); {_REBUILD_HINT}")
        else:
            # The ops' fake (meta) implementations are registered once the schemas exist.
            from prunedm.ops import _fake  # noqa: F401

            _LOADED = (_C, "")
    return _LOADED


def extension_loaded() -> bool:
    return _load()[0] is not None


def cuda_kernels_built() -> bool:
    module = _load()[0]
    return bool(module is not None and getattr(module, "WITH_CUDA", 0))


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


def _triton_status() -> tuple[bool, bool, str]:
    """(importable, interpreter on, reason when unusable)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, False, f"triton is not installed ({exc}); `pip install triton`"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return True, interpret, ""


def extension_info() -> dict:
    """Which backends (cpu, cuda, triton) are built and usable here, and why not.

    Returns {"cpu": {...}, "cuda": {...}, "triton": {...}, "torch": version, ...}; each backend
    entry has "built" and "usable" (bools) and "reason" (empty when usable). "cuda_kernels" says which
    CUDA sparse kernels run: "extension" (prunedm._C), "nvrtc (cupy X.Y)" (compiled at first use, when
    _C has no CUDA and cupy is installed) or "none"; "cuda_kernels_reason" says why they cannot run
    here (empty when they can)."""
    module, load_error = _load()
    cuda_device = torch.cuda.is_available()
    info: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}

    info["cpu"] = {"built": module is not None, "usable": module is not None, "reason": load_error}

    if module is None:
        cuda = {"built": False, "usable": False, "reason": load_error}
    elif not getattr(module, "WITH_CUDA", 0):
        cuda = {
            "built": False,
            "usable": False,
            "reason": "built without CUDA kernels (no nvcc found, or PRUNEDM_SKIP_CUDA_BUILD=1): reinstall on a "
            "machine with the CUDA toolkit's nvcc on PATH",
        }
    elif not cuda_device:
        cuda = {"built": True, "usable": False, "reason": "no CUDA device is visible"}
    else:
        cuda = {"built": True, "usable": True, "reason": ""}
    if cuda_device:
        cuda["device"] = torch.cuda.get_device_name()
        cuda["capability"] = "%d.%d" % torch.cuda.get_device_capability()
    info["cuda"] = cuda
    # The 2:4 sparse linear/conv kernels: the extension's, else the same sources compiled by NVRTC (cupy).
    info["cuda_kernels"], info["cuda_kernels_reason"] = _cuda_kernels_path(cuda, cuda_device)

    importable, interpret, reason = _triton_status()
    triton_info = {"built": importable, "usable": False, "interpret": interpret, "reason": reason}
    if importable:
        import triton

        triton_info["version"] = triton.__version__
        if cuda_device or interpret:
            triton_info["usable"] = True
        else:
            triton_info["reason"] = "no CUDA device; set TRITON_INTERPRET=1 to run the kernels on CPU tensors"
    info["triton"] = triton_info
    return info


def triton_usable_on(device: torch.device) -> tuple[bool, str]:
    importable, interpret, reason = _triton_status()
    if not importable:
        return False, reason
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return True, ""
    if device.type == "cpu":
        return False, "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before importing prunedm)"
    return False, f"Triton kernels do not run on {device.type} tensors"
