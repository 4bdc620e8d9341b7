"""Builds prunedm._C: the C++ CPU ops always, the CUDA kernels whenever nvcc is found.

Knobs: PRUNEDM_SKIP_CUDA_BUILD=1 (CPU only), TORCH_CUDA_ARCH_LIST (default: sm_80, sm_86, sm_89,
sm_90a, as the toolkit allows), MAX_JOBS (parallel compile jobs, read by torch's ninja build)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

from setuptools import setup

PACKAGES = [
    "prunedm",
    "prunedm.cli",
    "prunedm.ops",
    "prunedm.kernels",
]
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


def _cuda_home() -> str | None:
    if os.environ.get("PRUNEDM_SKIP_CUDA_BUILD", "0") == "1":
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return CUDA_HOME
    if os.environ.get("PRUNEDM_REQUIRE_CUDA_BUILD", "0") == "1":
        raise RuntimeError("PRUNEDM_REQUIRE_CUDA_BUILD=1 but no nvcc was found: set CUDA_HOME or put nvcc on PATH")
    return None


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for
    include_dirs = [os.path.abspath("csrc/include")]
    cuda_home = _cuda_home()
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
            include_dirs=include_dirs,
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
    package_dir={"prunedm.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
