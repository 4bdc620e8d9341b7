"""The no-nvcc path (prunedm.ops._nvrtc) without a GPU: the assembled NVRTC source compiled by nvcc as NVRTC
sees it, and the loader, disk cache, launch arguments and dispatch driven through a fake cupy module."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import random_2to4

import prunedm
from prunedm import _ext
from prunedm.ops import _backends, _nvrtc, sparse_mm

REPO = Path(__file__).resolve().parents[2]

# A stand-in for cupy: records what prunedm hands to NVRTC, RawModule and the kernels in a JSON-lines log
# ($FAKE_CUPY_LOG), so that a second process can be checked too.
FAKE_CUPY = r"""
import json, os
__version__ = "13.4.1"
_current_stream = [0]

def _log(**event):
    with open(os.environ["FAKE_CUPY_LOG"], "a") as f:
        f.write(json.dumps(event) + "\n")

class _Nvrtc:
    NVRTCError = RuntimeError
    fail_log = None
    def getVersion(self): return (12, 6)
    def getSupportedArchs(self): return [75, 80, 86, 89, 90]
    def createProgram(self, src, name, headers, include_names):
        self.src, self.names = src, []
        return 7
    def addNameExpression(self, prog, name): self.names.append(name)
    def compileProgram(self, prog, options):
        _log(event="compile", options=list(options), names=self.names, source_len=len(self.src))
        if self.fail_log:
            raise self.NVRTCError("NVRTC_ERROR_COMPILATION (6)")
    def getProgramLog(self, prog): return self.fail_log or ""
    def getCUBIN(self, prog): return b"CUBIN" + str(len(self.src)).encode()
    def getPTX(self, prog): return "PTX" + str(len(self.src))
    def getLoweredName(self, prog, name): return "_lowered_" + name.replace(" ", "")
    def destroyProgram(self, prog): pass

class _Kernel:
    def __init__(self, name): self.name = name
    def __call__(self, grid, block, args, shared_mem=0):
        params = args[0]
        fields = {k: int(params[k][0]) for k in params.dtype.names}
        _log(event="launch", kernel=self.name, grid=list(grid), block=list(block), shared_mem=shared_mem,
             stream=_current_stream[0], nargs=len(args), size=int(params.size), itemsize=params.dtype.itemsize,
             params=fields)

class RawModule:
    def __init__(self, code=None, path=None, options=(), name_expressions=None):
        _log(event="module", path=path, image=open(path, "rb").read().decode() if path else None,
             code_len=None if code is None else len(code), options=list(options))
    def get_function(self, name): return _Kernel(name)

class _Ctx:
    def __init__(self, value=None): self.value = value
    def __enter__(self):
        self.saved = _current_stream[0]
        if self.value is not None: _current_stream[0] = self.value
        return self
    def __exit__(self, *exc): _current_stream[0] = self.saved

class _Cuda:
    nvrtc = _Nvrtc()
    include_root = None
    def get_cuda_path(self): return self.include_root
    def Device(self, index): return _Ctx()
    def ExternalStream(self, ptr): return _Ctx(ptr)

cuda = _Cuda()
"""


def _fake_module() -> types.ModuleType:
    module = types.ModuleType("cupy")
    exec(FAKE_CUPY, module.__dict__)
    return module


def _events(log: Path, kind: str) -> list[dict]:
    if not log.exists():
        return []
    return [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == kind]


@pytest.fixture(autouse=True)
def fresh_backend_table():
    """The backend table caches its choices: these tests fake the environment under it."""
    _backends.clear_cache()
    yield
    _backends.clear_cache()


@pytest.fixture
def fake_cupy(tmp_path, monkeypatch):
    """A fake cupy in sys.modules, a fresh cache dir, CUDA headers it points at, and an empty kernel memo."""
    cupy = _fake_module()
    toolkit = tmp_path / "toolkit"
    (toolkit / "include").mkdir(parents=True)
    for header in ("cuda_fp16.h", "cuda_bf16.h"):
        (toolkit / "include" / header).write_text("// fake\n")
    cupy.cuda.include_root = str(toolkit)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setenv("FAKE_CUPY_LOG", str(tmp_path / "cupy.log"))
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_backends, "_NVRTC_STATUS", None)
    _backends.clear_cache()
    _nvrtc.clear_loaded()
    yield types.SimpleNamespace(module=cupy, log=tmp_path / "cupy.log", cache=tmp_path / "cache" / "nvrtc",
                                include=str(toolkit / "include"), tmp=tmp_path)  # fmt: skip
    _nvrtc.clear_loaded()
    _backends.clear_cache()


# -- the source ------------------------------------------------------------------------------------------


def test_assembled_source_is_one_self_contained_unit():
    source = _nvrtc.assemble_source()
    includes = [line.strip() for line in source.splitlines() if re.match(r"\s*#\s*include", line)]
    # Only the prelude's guarded standard headers and the CUDA half types remain to be found.
    assert includes == [
        "#include <cstdint>",
        "#include <type_traits>",
        "#include <cuda_bf16.h>",
        "#include <cuda_fp16.h>",
    ]
    headers = ("sparse_gemm.h", "implicit_gemm.h", "sparse24.h", "split_k.h")
    for part in ("cuda/nvrtc_entry.cu", "cuda/sparse_gemm_kernel.cuh", *(f"include/prunedm/{h}" for h in headers)):
        assert source.count(f"// ---- {part}\n") == 1
    assert "#pragma once" not in source and "sparse_gemm_host.cuh" not in source
    for name in _nvrtc.KERNELS.values():
        inner = name.split("sparse_gemm_kernel")[1]
        assert f"template __global__ void sparse_gemm_kernel{inner}(" in source


def test_package_data_ships_every_source_nvrtc_reads():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["prunedm._csrc"]
    used = re.findall(r"^// ---- (\S+)$", _nvrtc.assemble_source(), flags=re.M)
    assert len(used) == 6
    for path in used:
        assert any(fnmatch(path, g) for g in globs), path
    assert "cupy-cuda12x" in config["project"]["optional-dependencies"]["cupy"]


def test_params_layout_matches_the_kernel_struct():
    # nvrtc_entry.cu static_asserts the same offsets on Params<T> (compiled by the nvcc test below).
    dtype = _nvrtc.PARAMS_DTYPE
    assert dtype.itemsize == 248
    offsets = {name: dtype.fields[name][1] for name in dtype.names}
    assert [offsets[n] for n in ("values", "meta", "b", "bias", "residual", "out")] == [0, 8, 16, 24, 32, 40]
    assert (offsets["m"], offsets["p"], offsets["k"], offsets["activation"]) == (48, 56, 64, 72)
    assert (offsets["res_out_h"], offsets["res_stride_w"], offsets["conv_batch"], offsets["conv_out_w"]) == (
        80, 120, 128, 232
    )  # fmt: skip
    assert offsets["workspace"] == 240


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("std_headers", [True, False], ids=["std-headers", "fallbacks"])
def test_nvcc_compiles_the_assembled_source(tmp_path, arch, std_headers):
    src = tmp_path / "assembled.cu"
    src.write_text(_nvrtc.assemble_source())
    extra = [] if std_headers else ["-DPRUNEDM_NVRTC_NO_STD=1"]
    cmd = [NVCC, *_nvrtc.COMMON_OPTIONS, *extra, f"-arch={arch}", "-ptx", "-diag-suppress", "177", str(src)]
    subprocess.run([*cmd, "-o", str(tmp_path / "out.ptx")], check=True, capture_output=True, text=True)
    ptx = (tmp_path / "out.ptx").read_text()
    entries = re.findall(r"^\.visible \.entry (\S+)\(\n\s*\.param \.align 8 \.b8 \S+\[(\d+)\]", ptx, flags=re.M)
    assert len(entries) == 10 and {size for _, size in entries} == {"248"}
    gemms = [e for e, _ in entries if "sparse_gemm_kernel" in e]  # (fp16, bf16) x (linear, conv) x split-K
    assert len(gemms) == 8 and {e.split("sparse_gemm_kernel")[1][:4] for e in gemms} == {"I6__", "I13_"}
    assert sum("split_k_reduce_kernel" in e for e, _ in entries) == 2
    assert len(re.findall(r"\bmma\.sp", ptx)) >= 4 * 8  # 2 m16 x 4 n8 tiles per k step, in each kernel
    assert "cp.async.cg.shared.global" in ptx


# -- the loader and its cache ------------------------------------------------------------------------------


def test_compile_options_source_and_names(fake_cupy):
    kernels = _nvrtc.load_kernels(0, 80)
    (compile_event,) = _events(fake_cupy.log, "compile")
    assert compile_event["source_len"] == len(_nvrtc.assemble_source())
    assert compile_event["options"] == ["-std=c++17", "-DPRUNEDM_NVRTC=1", "--gpu-architecture=sm_80",
                                        f"-I{fake_cupy.include}"]  # fmt: skip
    assert compile_event["names"] == list(_nvrtc.KERNELS.values())
    (entry,) = list(fake_cupy.cache.iterdir())
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["arch"] == 80 and manifest["cupy"] == "13.4.1" and manifest["nvrtc"] == "12.6"
    assert (entry / "kernels.cubin").read_bytes() == b"CUBIN%d" % compile_event["source_len"]
    (module_event,) = _events(fake_cupy.log, "module")
    assert module_event["path"] == str(entry / "kernels.cubin")
    half_linear = _nvrtc.KERNELS[(torch.float16, False)]
    assert kernels[half_linear].name == "_lowered_" + half_linear.replace(" ", "")


def test_cache_is_reused_in_process_and_across_processes(fake_cupy):
    _nvrtc.load_kernels(0, 80)
    _nvrtc.load_kernels(0, 80)  # memoised
    assert len(_events(fake_cupy.log, "compile")) == 1 and len(_events(fake_cupy.log, "module")) == 1
    _nvrtc.clear_loaded()
    _nvrtc.load_kernels(0, 80)  # from disk
    assert len(_events(fake_cupy.log, "compile")) == 1 and len(_events(fake_cupy.log, "module")) == 2

    package = fake_cupy.tmp / "site" / "cupy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_CUPY + f"\ncuda.include_root = {str(Path(fake_cupy.include).parent)!r}\n")
    script = "from prunedm.ops import _nvrtc; print(sorted(_nvrtc.load_kernels(0, 80)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package.parent), str(REPO)])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, text=True)
    assert len(_events(fake_cupy.log, "compile")) == 1  # the other process compiled nothing
    assert len(_events(fake_cupy.log, "module")) == 3


def test_cache_key_follows_arch_and_versions(fake_cupy):
    _nvrtc.load_kernels(0, 80)
    _nvrtc.load_kernels(0, 87)  # unknown to this NVRTC: PTX for the newest arch below, JIT-compiled
    fake_cupy.module.__version__ = "14.0.0"
    _nvrtc.load_kernels(0, 80)
    compiles = _events(fake_cupy.log, "compile")
    assert [c["options"][2] for c in compiles] == ["--gpu-architecture=sm_80", "--gpu-architecture=compute_86",
                                                   "--gpu-architecture=sm_80"]  # fmt: skip
    entries = sorted(fake_cupy.cache.iterdir())
    assert len(entries) == 3
    assert sum((e / "kernels.ptx").is_file() for e in entries) == 1


def test_corrupt_manifest_recompiles(fake_cupy):
    _nvrtc.load_kernels(0, 80)
    (entry,) = list(fake_cupy.cache.iterdir())
    (entry / "manifest.json").write_text("{not json")
    _nvrtc.clear_loaded()
    _nvrtc.load_kernels(0, 80)
    assert len(_events(fake_cupy.log, "compile")) == 2
    assert json.loads((entry / "manifest.json").read_text())["arch"] == 80


def test_missing_cuda_headers_error_says_what_to_do(fake_cupy, monkeypatch):
    fake_cupy.module.cuda.nvrtc.fail_log = (
        'prunedm_nvrtc_entry.cu(62): catastrophic error: cannot open source file "cuda_bf16.h"'
    )
    monkeypatch.setattr(_nvrtc, "cuda_include_dirs", lambda: [])
    with pytest.raises(RuntimeError, match=r"(?s)cannot open source file.*set CUDA_PATH"):
        _nvrtc.load_kernels(0, 80)
    assert not list(fake_cupy.cache.glob("*/manifest.json"))


def test_cuda_include_dirs_from_cuda_path(fake_cupy, monkeypatch, tmp_path):
    fake_cupy.module.cuda.include_root = None
    toolkit = tmp_path / "cuda-from-env"
    (toolkit / "include").mkdir(parents=True)
    for header in ("cuda_fp16.h", "cuda_bf16.h"):
        (toolkit / "include" / header).write_text("")
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    assert _nvrtc.cuda_include_dirs() == [str(toolkit / "include")]


# -- launches ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(fake_cupy, monkeypatch):
    """CPU tensors stand in for CUDA ones: only pointers and shapes reach the fake kernels."""
    monkeypatch.setattr(_nvrtc, "_check_cuda", lambda op, input: 80)
    monkeypatch.setattr(_nvrtc, "current_stream_ptr", lambda device: 0xABC0)
    return fake_cupy


def test_linear_launch_arguments(fake_gpu):
    dense = random_2to4(96, 64, torch.float16)
    values, meta = prunedm.ops.compress_2to4(dense)
    x = torch.randn(3, 70, 64).half()
    bias, residual = torch.randn(96).half(), torch.randn(3, 70, 96).half()
    out = _nvrtc.sparse_linear_2to4(x, values, meta, bias, "gelu", residual)
    assert out.shape == (3, 70, 96) and out.dtype == torch.float16
    (launch,) = _events(fake_gpu.log, "launch")
    assert launch["kernel"] == "_lowered_" + _nvrtc.KERNELS[(torch.float16, False)].replace(" ", "")
    assert launch["grid"] == [2, 1, 1] and launch["block"] == [128, 1, 1] and launch["shared_mem"] == 0
    assert launch["stream"] == 0xABC0 and launch["nargs"] == 1 and launch["size"] == 1 and launch["itemsize"] == 248
    p = launch["params"]
    pointers = [p[n] for n in ("values", "meta", "b", "bias", "residual", "out")]
    assert pointers == [t.data_ptr() for t in (values, meta, x, bias, residual, out)]
    assert (p["m"], p["p"], p["k"], p["activation"]) == (96, 210, 64, 3)
    assert (p["res_out_h"], p["res_out_w"], p["res_stride_n"], p["res_stride_c"]) == (1, 1, 96, 1)
    assert p["conv_batch"] == 0


def test_linear_broadcast_residual_and_no_bias(fake_gpu):
    values, meta = prunedm.ops.compress_2to4(random_2to4(32, 32, torch.bfloat16))
    residual = torch.randn(32).bfloat16()
    _nvrtc.sparse_linear_2to4(torch.randn(5, 32).bfloat16(), values, meta, None, "none", residual)
    (launch,) = _events(fake_gpu.log, "launch")
    assert launch["kernel"].endswith("__nv_bfloat16,false>")
    p = launch["params"]
    assert p["bias"] == 0 and p["residual"] == residual.data_ptr()
    assert (p["res_stride_n"], p["res_stride_c"]) == (0, 1)
    assert _nvrtc.sparse_linear_2to4(torch.randn(0, 32).bfloat16(), values, meta).shape == (0, 32)
    assert len(_events(fake_gpu.log, "launch")) == 1  # nothing launched for 0 tokens


def test_conv_launch_arguments(fake_gpu):
    cout, cin, kh, kw = 64, 16, 2, 2
    matrix = random_2to4(cout, kh * kw * cin, torch.float16)
    values, meta = prunedm.ops.compress_2to4(matrix)
    x = torch.randn(2, cin, 9, 11).half().contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, cout, 5, 6).half()
    out = _nvrtc.sparse_conv2d_2to4(
        x, values, meta, (cout, cin, kh, kw), None, (2, 2), (1, 1), (1, 1), "relu", residual
    )
    assert out.shape == (2, cout, 5, 6) and out.is_contiguous(memory_format=torch.channels_last)
    (launch,) = _events(fake_gpu.log, "launch")
    assert launch["kernel"].endswith("__half,true>")
    assert launch["grid"] == [1, 1, 1] and launch["block"] == [128, 1, 1]
    p = launch["params"]
    assert (p["b"], p["out"], p["residual"]) == (x.data_ptr(), out.data_ptr(), residual.data_ptr())
    assert (p["m"], p["p"], p["k"], p["activation"]) == (64, 60, 64, 1)
    geometry = [p[f"conv_{n}"] for n in _nvrtc._CONV_FIELDS]
    assert geometry == [2, 16, 9, 11, 2, 2, 2, 2, 1, 1, 1, 1, 5, 6]
    assert [p[f"res_{n}"] for n in _nvrtc._RES_FIELDS] == [5, 6, *residual.stride()]
    nchw = torch.randn(2, 4, 6, 6).half()
    values4, meta4 = prunedm.ops.compress_2to4(random_2to4(32, 32, torch.float16))
    with pytest.raises(ValueError, match=r"Cin = 4\) to be a multiple of 8"):
        _nvrtc.sparse_conv2d_2to4(nchw, values4, meta4, (32, 4, 2, 4))


# -- dispatch and reporting --------------------------------------------------------------------------------


def _without_cuda_extension(monkeypatch):
    monkeypatch.setattr(_ext, "_LOADED", (types.SimpleNamespace(WITH_CUDA=0), ""))
    _backends.clear_cache()


def test_reports_none_when_cupy_is_missing(monkeypatch):
    _without_cuda_extension(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    monkeypatch.setattr(_backends, "_NVRTC_STATUS", None)
    info = prunedm.extension_info()
    assert info["cuda_kernels"] == "none"
    assert "built without CUDA kernels" in info["cuda_kernels_reason"]
    assert "cupy is not installed" in info["cuda_kernels_reason"] and "prunedm[cupy]" in info["cuda_kernels_reason"]
    usable, reason = prunedm.ops.sparse_kernels_available("cuda")
    assert not usable and "built without CUDA kernels" in reason and "NVRTC path cannot run" in reason


def test_reports_nvrtc_with_cupy(fake_cupy, monkeypatch):
    _without_cuda_extension(monkeypatch)
    info = prunedm.extension_info()
    assert info["cuda_kernels"] == "nvrtc (cupy 13.4)"
    assert info["cuda_kernels_reason"] == ("" if torch.cuda.is_available() else "no CUDA device is visible")
    monkeypatch.setattr(_ext, "_LOADED", None)  # the real extension, built with CUDA here
    if prunedm.extension_info()["cuda"]["built"]:
        assert prunedm.extension_info()["cuda_kernels"] == "extension"


def test_dispatch_picks_nvrtc_without_the_cuda_extension(fake_cupy, monkeypatch):
    _without_cuda_extension(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(_nvrtc, "device_capability", lambda device: (8, 0))
    cuda_half = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16)
    assert sparse_mm.sparse_kernel_backend("cuda", dtype=torch.float16) == ("nvrtc", "")
    assert sparse_mm._choose("sparse_conv2d_2to4", "auto", cuda_half, False) == "nvrtc"
    assert sparse_mm._choose("sparse_conv2d_2to4", "nvrtc", cuda_half, False) == "nvrtc"
    assert sparse_mm._choose("sparse_conv2d_2to4", "auto", cuda_half, True) == "reference"  # autograd
    assert sparse_mm._choose("sparse_conv2d_2to4", "auto", cuda_half, False, conv_in_channels=12) == "reference"
    with pytest.raises(RuntimeError, match="extension backend cannot run here: built without CUDA"):
        sparse_mm._choose("sparse_conv2d_2to4", "extension", cuda_half, False)
    with pytest.raises(RuntimeError, match="nvrtc kernels have no backward"):
        sparse_mm._choose("sparse_conv2d_2to4", "nvrtc", cuda_half, True)
    cuda_float = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="take float16 or bfloat16"):
        sparse_mm._choose("sparse_conv2d_2to4", "nvrtc", cuda_float, False)
    monkeypatch.setattr(_nvrtc, "device_capability", lambda device: (7, 5))
    assert sparse_mm.sparse_kernel_backend("cuda")[0] is None


def test_explicit_nvrtc_backend_refuses_cpu_tensors(fake_cupy):
    values, meta = prunedm.ops.compress_2to4(random_2to4(32, 32, torch.float16))
    with pytest.raises(RuntimeError, match="nvrtc backend cannot run here: the nvrtc backend runs CUDA tensors"):
        prunedm.ops.sparse_linear_2to4(torch.randn(4, 32).half(), values, meta, backend="nvrtc")
    with pytest.raises(ValueError, match=r"backend must be one of \(.*'nvrtc'\)"):
        prunedm.ops.sparse_linear_2to4(torch.randn(4, 32).half(), values, meta, backend="cupy")


# -- the tensor's device, and a cache that is only a cache ------------------------------------------------------


class _DeviceCtx:
    current = [0]

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        self.saved = _DeviceCtx.current[0]
        if self.index is not None:
            _DeviceCtx.current[0] = self.index

    def __exit__(self, *exc):
        _DeviceCtx.current[0] = self.saved


def test_kernels_load_and_launch_on_the_tensors_device(fake_gpu):
    seen = []
    cupy = fake_gpu.module

    class Module(cupy.RawModule):
        def __init__(self, **kwargs):
            seen.append(("load", _DeviceCtx.current[0]))
            super().__init__(**kwargs)

        def get_function(self, name):
            seen.append(("get", _DeviceCtx.current[0]))
            kernel = super().get_function(name)
            return lambda *a, **k: (seen.append(("launch", _DeviceCtx.current[0])), kernel(*a, **k))

    cupy.RawModule = Module
    cupy.cuda.Device = _DeviceCtx
    _DeviceCtx.current[0] = 0  # the current device is cuda:0, the tensor lives on cuda:1
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.float16)
    params = _nvrtc.make_params(*[None] * 6, 32, 8, 32, 0, (1, 1, 0, 0, 0, 0))
    _nvrtc._launch("sparse_linear_2to4", on_gpu1, False, params, 32, 8, 80)
    assert seen[0] == ("load", 1) and {s for s in seen if s[0] == "get"} == {("get", 1)}
    assert seen[-1] == ("launch", 1) and _DeviceCtx.current[0] == 0
    # Loaded per device: cuda:0 gets its own module, loaded on cuda:0.
    seen.clear()
    _nvrtc._launch("sparse_linear_2to4", types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16),
                   False, params, 32, 8, 80)  # fmt: skip
    assert seen[0] == ("load", 0) and seen[-1] == ("launch", 0)
    assert len(_events(fake_gpu.log, "compile")) == 1  # one compile, two loads


def _unwritable_by_permission(monkeypatch, root: Path):
    real = _nvrtc.write_bytes_atomic

    def write(path, data):
        if Path(path).is_relative_to(root):
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(_nvrtc, "write_bytes_atomic", write)


@pytest.mark.parametrize("how", ["permission", "file-in-the-way"])
def test_unwritable_cache_dir_falls_back_with_one_warning(how, fake_cupy, monkeypatch, tmp_path):
    monkeypatch.setattr(_nvrtc, "_FALLBACK_ROOT", None)
    if how == "permission":
        _unwritable_by_permission(monkeypatch, fake_cupy.cache)
    else:
        (tmp_path / "blocked").write_text("a file where the cache dir should be")
        monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path / "blocked"))
    with pytest.warns(UserWarning, match="cannot be written") as caught:
        kernels = _nvrtc.load_kernels(0, 80)
    assert len([w for w in caught if "cannot be written" in str(w.message)]) == 1
    assert len(kernels) == len(_nvrtc.KERNELS)
    (module_event,) = _events(fake_cupy.log, "module")
    fallback = _nvrtc._FALLBACK_ROOT
    assert fallback is not None and module_event["path"].startswith(str(fallback))
    assert module_event["image"].startswith("CUBIN")
    _nvrtc.clear_loaded()
    import warnings

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _nvrtc.load_kernels(0, 80)  # the process's fallback copy: no second compile, no second warning
    assert not [w for w in again if "cannot be written" in str(w.message)]
    assert len(_events(fake_cupy.log, "compile")) == 1 and len(_events(fake_cupy.log, "module")) == 2
    import shutil

    shutil.rmtree(fallback, ignore_errors=True)


@pytest.mark.parametrize("manifest", ["[1, 2, 3]", '"a string"', "null", '{"lowered_names": [1]}', "\x00\xff garbage"])
def test_manifest_of_the_wrong_shape_is_ignored_and_rebuilt(manifest, fake_cupy):
    _nvrtc.load_kernels(0, 80)
    (entry,) = list(fake_cupy.cache.iterdir())
    (entry / "manifest.json").write_text(manifest)
    _nvrtc.clear_loaded()
    kernels = _nvrtc.load_kernels(0, 80)
    assert len(kernels) == len(_nvrtc.KERNELS) and len(_events(fake_cupy.log, "compile")) == 2
    rebuilt = json.loads((entry / "manifest.json").read_text())
    assert rebuilt["arch"] == 80 and set(rebuilt["lowered_names"]) == set(_nvrtc.KERNELS.values())
    assert not [p for p in entry.iterdir() if ".prunedm-tmp-" in p.name]
