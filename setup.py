"""Builds prunedm._C: the C++ CPU ops always, the CUDA kernels whenever nvcc is found.

Knobs: PRUNEDM_SKIP_CUDA_BUILD=1 (CPU only), TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch + PTX,
else sm_80, sm_90a + compute_80 PTX), MAX_JOBS (parallel compile jobs, read by torch's ninja build)."""

from __future__ import annotations

import glob
import math
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

# prunedm and its subpackages, plus the top-level kernels/ (Triton) and bench/ (benchmark harness)
# installed as prunedm.kernels and prunedm.bench, and the torch-free CUDA sources of csrc/ as the data-only
# prunedm._csrc, which NVRTC compiles at first use when no nvcc built the CUDA kernels (prunedm/ops/_nvrtc.py).
PACKAGES = [*find_packages(include=["prunedm", "prunedm.*"]), "prunedm.kernels", "prunedm.bench", "prunedm._csrc"]
# With no GPU visible: what CI and the prebuilt GPU package compile (sm_80, sm_90a), plus compute_80 PTX that
# the driver compiles at load time for any other arch of 8.0 or newer, including future ones.
CI_ARCHS = ["8.0+PTX", "9.0a"]
# Core-minutes to compile one CUDA source for one arch, and one C++ source: 4 archs of the kernels took 20
# minutes on 2 cores (issue 13). The printed estimate is this over the compile jobs, rounded up.
CORE_MINUTES_PER_CUDA_ARCH = 2.0
CORE_MINUTES_PER_CXX = 1.0
BUILD_PLAN: list[str] = []  # the line build_ext prints when it starts compiling


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


def default_cuda_archs(supported: set[str], cuda=None) -> tuple[list[str], str]:
    """TORCH_CUDA_ARCH_LIST entries to build when the user set none, and where they come from.

    A visible GPU: its arch only (each distinct one when several), PTX of the newest for forward
    compatibility. No GPU (or one this nvcc cannot target): CI_ARCHS. `supported` is what nvcc can
    target ('8.0'-style; empty when unknown, then nothing is filtered); `cuda` stands in for torch.cuda."""
    if cuda is None:
        import torch

        cuda = torch.cuda
    fits = lambda arch: not supported or arch.split("+")[0].removesuffix("a") in supported  # noqa: E731
    try:
        visible = cuda.is_available() and cuda.device_count() > 0
        capabilities = sorted({tuple(cuda.get_device_capability(i)) for i in range(cuda.device_count())})
    except Exception:  # a broken driver is not a reason to fail the build: build the CI set
        visible, capabilities = False, []
    archs = [f"{major}.{minor}" for major, minor in capabilities if visible and fits(f"{major}.{minor}")]
    if archs:
        archs[-1] += "+PTX"
        return archs, "the visible GPU" if len(archs) == 1 else "the visible GPUs"
    return [a for a in CI_ARCHS if fits(a)] or CI_ARCHS, "no GPU visible: the CI set"


def describe_archs(archs: list[str]) -> str:
    """'8.0+PTX', '9.0a' -> 'sm_80, sm_90a (+compute_80 PTX)'."""
    names = [f"sm_{a.split('+')[0].replace('.', '')}" for a in archs]
    ptx = [f"compute_{a.split('+')[0].replace('.', '')}" for a in archs if a.endswith("+PTX")]
    return ", ".join(names) + (f" (+{', '.join(ptx)} PTX)" if ptx else "")


def estimated_build_minutes(cuda_sources: int, cxx_sources: int, archs: list[str], jobs: int) -> int:
    """Rough wall-clock minutes of the build: core-minutes of every (source, arch) over the compile jobs."""
    arch_units = sum(1.25 if a.endswith("+PTX") else 1.0 for a in archs)
    core_minutes = cuda_sources * arch_units * CORE_MINUTES_PER_CUDA_ARCH + cxx_sources * CORE_MINUTES_PER_CXX
    return max(1, math.ceil(core_minutes / max(1, jobs)))


def _compile_jobs() -> int:
    jobs = os.environ.get("MAX_JOBS", "")
    cores = os.cpu_count() or 1
    return min(int(jobs), cores) if jobs.isdigit() and int(jobs) > 0 else cores


def _announce(message: str) -> None:
    """Say what is being built, also on the terminal when pip hides the build's output (without -v)."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message + "\n")
    except OSError:  # no terminal (CI, a container without one): the log line above is all there is
        pass


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
    jobs = _compile_jobs()
    if cuda_home is None:
        minutes = estimated_build_minutes(0, len(cpp_sources), [], jobs)
        why = "PRUNEDM_SKIP_CUDA_BUILD=1" if os.environ.get("PRUNEDM_SKIP_CUDA_BUILD") == "1" else "no nvcc found"
        BUILD_PLAN.append(f"building prunedm._C: C++ CPU ops only ({why}), about {minutes} minute(s) on {jobs} core(s)")
        return [
            CppExtension("prunedm._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})
        ]

    source = "TORCH_CUDA_ARCH_LIST"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        archs, source = default_cuda_archs(_nvcc_archs(os.path.join(cuda_home, "bin", "nvcc")))
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    archs = [a for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    minutes = estimated_build_minutes(len(cuda_sources), len(cpp_sources), archs, jobs)
    BUILD_PLAN.append(
        f"building prunedm._C: CUDA kernels for {describe_archs(archs)} ({source}), about {minutes} minutes on "
        f"{jobs} core(s); PRUNEDM_SKIP_CUDA_BUILD=1 to skip, TORCH_CUDA_ARCH_LIST to choose"
    )
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    # Toolkits unpacked from tarballs or pip keep their libraries in lib/, not lib64/.
    library_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
    return [
        CUDAExtension(
            "prunedm._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs + _library_header_dirs(cuda_home),
            library_dirs=library_dirs,
            define_macros=[("PRUNEDM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class AnnouncedBuildExtension(base):
        """Says what it compiles and for how long when the compiling starts (not on metadata-only runs)."""

        def run(self):
            for line in BUILD_PLAN:
                _announce(line)
            super().run()

    return AnnouncedBuildExtension


# setuptools runs this file as __main__ (pip, python setup.py); tests import the functions above.
if __name__ == "__main__":
    setup(
        packages=PACKAGES,
        package_dir={"prunedm.kernels": "kernels", "prunedm.bench": "bench", "prunedm._csrc": "csrc"},
        ext_modules=_extensions(),
        cmdclass={"build_ext": _build_ext()},
    )
