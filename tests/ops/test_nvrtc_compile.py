"""The assembled NVRTC source compiled by NVRTC itself (libnvrtc from the nvidia-cuda-nvrtc / cu13 wheels, no GPU
needed): nvcc accepts things NVRTC does not (__builtin_offsetof, host standard headers), so test_nvrtc.py's nvcc
compile alone missed that NVRTC refused the source."""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import pytest

from prunedm.ops import _nvrtc


def _libnvrtc() -> str | None:
    for site in sys.path:
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            found = [p for p in sorted(glob.glob(os.path.join(site, pattern))) if "builtins" not in p]
            found = [p for p in found if ".alt." not in p]
            if found:
                return found[0]
    return None


LIB = _libnvrtc()


@pytest.mark.slow  # one NVRTC compile of the four kernels: ~25 s of CPU
@pytest.mark.skipif(LIB is None or not _nvrtc.cuda_include_dirs(), reason="no libnvrtc / CUDA headers installed")
def test_nvrtc_compiles_the_assembled_source_without_std_headers():
    lib = ctypes.CDLL(LIB)
    prog = ctypes.c_void_p()
    source = _nvrtc.assemble_source().encode()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"prunedm.cu", 0, None, None) == 0
    try:
        for name in _nvrtc.KERNELS.values():
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
        options = [*_nvrtc.COMMON_OPTIONS, "-DPRUNEDM_NVRTC_NO_STD=1", "--gpu-architecture=sm_80"]
        options += [f"-I{d}" for d in _nvrtc.cuda_include_dirs()]
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert status == 0, log.value.decode(errors="replace")[:4000]
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        assert size.value > 0
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
