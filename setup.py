"""Builds prunedm._C: the C++ CPU ops always, the CUDA kernels whenever nvcc is found.

Knobs: PRUNEDM_SKIP_CUDA_BUILD=1 (CPU only), TORCH_CUDA_ARCH_LIST (default: sm_80, sm_86, sm_89,
sm_90a, as the toolkit allows), MAX_JOBS (parallel compile jobs, read by torch's ninja build)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

# prunedm and its subpackages, plus the top-level kernels/ (Triton) and bench/ (benchmark harness)
# installed as prunedm.kernels and prunedm.bench, and the torch-free CUDA sources of csrc/ as the data-only
# prunedm._csrc, which NVRTC compiles at first use when no nvcc built the CUDA kernels (prunedm/ops/_nvrtc.py).
PACKAGES = [*find_packages(include=["prunedm", "prunedm.*"]), "prunedm.kernels", "prunedm.bench", "prunedm._csrc"]
DEFAULT_ARCHS = ["8.0", "8.6", "8.9", "9.0a"]


def _nvcc_archs(nvcc: str) -> set[str]:
    """Compute capabilities this nvcc can target, as '8.0'-style strings."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    archs = set()
    for token in out.split():
        digits = token.removeprefix("compute_")
        if digits.isdigit():
            archs.add(f"{digits[:-1]}.{digits[-1]}")
    return archs


def _toolkit_root(candidate: str | None) -> str | None:
    if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
        if os.path.isfile(os.path.join(candidate, "include", "cuda_runtime.h")):
            return candidate
    return None


def _find_cuda_home() -> str | None:
    """The CUDA toolkit to compile with: CUDA_HOME/CUDA_PATH, else the one behind `nvcc` on PATH.

    nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), whose parent is not a
    toolkit, so each candidate must hold bin/nvcc and include/cuda_runtime.h."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: ask nvcc where its toolkit is
            dryrun = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True
            ).stderr
            candidates += [os.path.normpath(line.split("=", 1)[1].strip()) for line in dryrun.splitlines()
                           if line.startswith("#$ TOP=")]  # fmt: skip
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    return next((root for root in map(_toolkit_root, candidates) if root), None)


def _cuda_home() -> str | None:
    if os.environ.get("PRUNEDM_SKIP_CUDA_BUILD", "0") == "1":
        return None
    cuda_home = _find_cuda_home()
    if cuda_home is None and os.environ.get("PRUNEDM_REQUIRE_CUDA_BUILD", "0") == "1":
        raise RuntimeError("PRUNEDM_REQUIRE_CUDA_BUILD=1 but no CUDA toolkit (bin/nvcc, include/cuda_runtime.h) "
                           "was found: set CUDA_HOME or put nvcc on PATH")  # fmt: skip
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
        os.environ["CUDA_HOME"] = cuda_home
    return cuda_home


def _library_header_dirs(cuda_home: str) -> list[str]:
    """Include dirs of the CUDA libraries torch's headers use (cuBLAS, cuSPARSE, ...).

    A toolkit installed with nvcc alone lacks them; torch's wheels bring them as nvidia-* packages
    next to torch, so those include dirs are used then."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def _extensions():
    cuda_home = _cuda_home()  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for
    include_dirs = [os.path.abspath("csrc/include")]
    if cuda_home is None:
        return [
            CppExtension("prunedm._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})
        ]

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        supported = _nvcc_archs(os.path.join(cuda_home, "bin", "nvcc"))
        archs = [a for a in DEFAULT_ARCHS if a.removesuffix("a") in supported] or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    # Toolkits unpacked from tarballs or pip keep their libraries in lib/, not lib64/.
    library_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
    return [
        CUDAExtension(
            "prunedm._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs + _library_header_dirs(cuda_home),
            library_dirs=library_dirs,
            define_macros=[("PRUNEDM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    packages=PACKAGES,
    package_dir={"prunedm.kernels": "kernels", "prunedm.bench": "bench", "prunedm._csrc": "csrc"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
