"""Loads the compiled extension prunedm._C defensively, checks its ABI once, and reports what is usable.

`import prunedm` never fails for want of the extension: every op has a reference path, and
extension_info() says what was built, what can run here, and how to get what is missing. It imports
nothing of prunedm: the ops build on it (prunedm.ops._backends), never the other way round."""

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
# The ABI this prunedm expects of prunedm._C: every op csrc/ops.cpp defines. Checked once, at load: a library
# missing one (built from an older checkout) counts as not loaded, so no call site guards against old builds.
REQUIRED_OPS = (
    "nm_mask",
    "nm_violations",
    "compress_2to4",
    "decompress_2to4",
    "conv_weight_to_matrix",
    "matrix_to_conv_weight",
    "gumbel_nm_sample",
    "gumbel_nm_sample_backward",
    "gumbel_pattern_sample",
    "gumbel_pattern_sample_backward",
    "sparse_linear_2to4",
    "sparse_conv2d_2to4",
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
            missing = [name for name in REQUIRED_OPS if not hasattr(torch.ops.prunedm, name)]
            if missing:
                _LOADED = (None, f"prunedm._C predates this prunedm (it lacks {', '.join(missing)}); {_REBUILD_HINT}")
            else:
                _LOADED = (_C, "")
    return _LOADED


def extension_loaded() -> bool:
    return _load()[0] is not None


def cuda_kernels_built() -> bool:
    module = _load()[0]
    return bool(module is not None and getattr(module, "WITH_CUDA", 0))


def _triton_status() -> tuple[bool, bool, str]:
    """(importable, interpreter on, reason when unusable)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, False, f"triton is not installed ({exc}); `pip install triton`"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return True, interpret, ""


def extension_info() -> dict:
    """Whether the extension (cpu, cuda) and Triton are built and usable here, and why not: {"cpu": {...},
    "cuda": {...}, "triton": {...}, "torch": version, ...}, each with "built", "usable" and "reason".
    prunedm.extension_info() (prunedm.ops._backends) adds which CUDA sparse kernels run."""
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
