"""The no-nvcc path of the 2:4 sparse CUDA kernels: when prunedm._C was built without CUDA, the same kernel
sources (csrc/cuda/nvrtc_entry.cu and what it includes) are compiled at first use with NVRTC through cupy
(`pip install prunedm[cupy]`), cached on disk, and launched on torch's current stream.

The cache: $PRUNEDM_CACHE_DIR/nvrtc/<key>/, else ~/.cache/prunedm/nvrtc/<key>/, holding the compiled image
and a manifest.json with the kernels' lowered (mangled) names; <key> hashes the assembled source, the
compile options, the GPU arch and the cupy and NVRTC versions. cupy keeps its own kernel cache, but only for
what cupy compiles itself (RawModule(code=...)), under its own key and directory; compiling through
NVRTC's API here and loading the image with RawModule(path=...) keeps the image, its lowered names and the
key under prunedm's cache dir, where `rm -r` or PRUNEDM_CACHE_DIR can reach them. When this cupy's NVRTC
binding lacks a function we need, RawModule(code=...) compiles instead and cupy's cache is the only one."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from prunedm._atomic import write_bytes_atomic
from prunedm.ops import _checks

ENV_CACHE_DIR = "PRUNEDM_CACHE_DIR"
CACHE_FORMAT = "prunedm.nvrtc"
CACHE_VERSION = 1
ENTRY_FILE = "cuda/nvrtc_entry.cu"
# Options NVRTC gets besides the arch and include dirs; tests/ops/test_nvrtc.py compiles the assembled
# source with nvcc and these same options.
COMMON_OPTIONS = ("-std=c++17", "-DPRUNEDM_NVRTC=1")
# The kernel templates nvrtc_entry.cu instantiates, by (dtype, conv).
KERNEL_TEMPLATE = "prunedm::sparse_gemm_cuda::sparse_gemm_kernel<{}, {}>"
_CUDA_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
KERNELS = {
    (dtype, conv): KERNEL_TEMPLATE.format(ctype, "true" if conv else "false")
    for dtype, ctype in _CUDA_TYPES.items()
    for conv in (False, True)
}
# The launch geometry of sparse_gemm_kernel.cuh: 128 threads compute 128 features x 128 columns (nvrtc_entry.cu
# asserts it); shared memory is static (asserted to fit 48 KiB), so no dynamic shared memory.
THREADS, BLOCK_M, BLOCK_N, DYNAMIC_SMEM_BYTES = 128, 128, 128, 0
# Standard headers the inlined prunedm headers include; nvrtc_entry.cu provides them (or fallbacks).
_PRELUDE_HEADERS = {"cstdint", "type_traits", "math.h", "cmath"}
_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^">]+)[">]')

# Params<T> of sparse_gemm_kernel.cuh as kernel-argument bytes; nvrtc_entry.cu static_asserts these offsets.
_POINTERS = ("values", "meta", "b", "bias", "residual", "out")
_RES_FIELDS = ("out_h", "out_w", "stride_n", "stride_c", "stride_h", "stride_w")
_CONV_FIELDS = ("batch", "in_channels", "in_h", "in_w", "kernel_h", "kernel_w", "stride_h", "stride_w",
                "pad_h", "pad_w", "dil_h", "dil_w", "out_h", "out_w")  # fmt: skip
_FIELDS = (
    [(name, np.uint64, 8 * i) for i, name in enumerate(_POINTERS)]
    + [("m", np.int64, 48), ("p", np.int64, 56), ("k", np.int64, 64), ("activation", np.int32, 72)]
    + [(f"res_{name}", np.int64, 80 + 8 * i) for i, name in enumerate(_RES_FIELDS)]
    + [(f"conv_{name}", np.int64, 128 + 8 * i) for i, name in enumerate(_CONV_FIELDS)]
    + [("workspace", np.uint64, 240)]  # split-K partials: always 0 here (this path launches without split-K)
)
PARAMS_DTYPE = np.dtype(
    {
        "names": [f[0] for f in _FIELDS],
        "formats": [f[1] for f in _FIELDS],
        "offsets": [f[2] for f in _FIELDS],
        "itemsize": 248,
    }  # fmt: skip
)

_LOCK = threading.Lock()
_LOADED: dict[tuple[int, str], dict] = {}  # (device index, cache key) -> {name expression: kernel}


# -- sources -------------------------------------------------------------------------------------------


def source_root() -> Path:
    """The directory holding cuda/ and include/prunedm/: the checkout's csrc/, or the wheel's prunedm/_csrc/."""
    package = Path(__file__).resolve().parent.parent
    for root in (package / "_csrc", package.parent / "csrc"):
        if (root / ENTRY_FILE).is_file():
            return root
    raise FileNotFoundError(
        f"prunedm's CUDA sources are missing (looked for {ENTRY_FILE} under {package / '_csrc'} and "
        f"{package.parent / 'csrc'}); reinstall prunedm, whose wheel ships them as package data"
    )


def assemble_source(root: Path | None = None) -> str:
    """nvrtc_entry.cu with every quoted include inlined once (searched beside the includer, then in
    include/), and the standard headers of _PRELUDE_HEADERS dropped (nvrtc_entry.cu provides them):
    one self-contained translation unit whose hash covers every source it uses."""
    root = source_root() if root is None else Path(root)
    seen: set[Path] = set()
    out: list[str] = []

    def inline(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        out.append(f"// ---- {path.relative_to(root.resolve()).as_posix()}")
        for line in path.read_text().splitlines():
            if line.strip() == "#pragma once":
                continue
            match = _INCLUDE.match(line)
            if match and match.group(1) == '"':
                for base in (path.parent, root / "include"):
                    if (base / match.group(2)).is_file():
                        inline(base / match.group(2))
                        break
                else:
                    raise FileNotFoundError(f"{path}: cannot find the included {match.group(2)!r}")
            elif match and path.name != Path(ENTRY_FILE).name and match.group(2) in _PRELUDE_HEADERS:
                out.append(f"// <{match.group(2)}>: provided by nvrtc_entry.cu")
            else:
                out.append(line)

    inline(root / ENTRY_FILE)
    return "\n".join(out) + "\n"


def cuda_include_dirs() -> list[str]:
    """The CUDA include dir holding cuda_fp16.h / cuda_bf16.h for NVRTC: the toolkit cupy found
    (cupy.cuda.get_cuda_path()), $CUDA_PATH, $CUDA_HOME, the nvidia-cuda-runtime wheels (cu12, cu13) on
    sys.path, /usr/local/cuda; [] when none has them (NVRTC may still have them built in)."""
    candidates = []
    try:
        cuda_path = _cupy().cuda.get_cuda_path()
    except Exception:  # cupy missing or without a toolkit: the other places still count
        cuda_path = None
    for root in (cuda_path, os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")):
        if root:
            candidates.append(Path(root) / "include")
    for site in sys.path:
        if site:
            candidates += [
                Path(site) / "nvidia" / "cuda_runtime" / "include",
                Path(site) / "nvidia" / "cu13" / "include",
            ]
    candidates.append(Path("/usr/local/cuda/include"))
    for directory in candidates:
        if (directory / "cuda_fp16.h").is_file() and (directory / "cuda_bf16.h").is_file():
            return [str(directory)]
    return []


# -- cupy and the cache ----------------------------------------------------------------------------------


def _cupy():
    return importlib.import_module("cupy")


def _nvrtc_binding(cupy):
    binding = getattr(getattr(cupy, "cuda", None), "nvrtc", None)
    if binding is None:
        binding = importlib.import_module("cupy_backends.cuda.libs.nvrtc")
    return binding


def cupy_hint() -> str:
    """How to install cupy for this torch's CUDA version."""
    major = (torch.version.cuda or "12").split(".")[0]
    wheel = "cupy-cuda13x" if major == "13" else "cupy-cuda12x"
    return f"`pip install prunedm[cupy]` ({wheel} for torch's CUDA {torch.version.cuda or '?'})"


def status() -> tuple[bool, str, str]:
    """(importable, reason when not, cupy version): whether the NVRTC path can be tried at all. Needs cupy
    and the kernel sources; the GPU and its arch are checked per call."""
    try:
        cupy = _cupy()
    except ImportError as exc:
        return False, f"cupy is not installed ({exc}); {cupy_hint()}", ""
    version = str(getattr(cupy, "__version__", "?"))
    try:
        source_root()
    except FileNotFoundError as exc:
        return False, str(exc), version
    return True, "", version


def cache_root() -> Path:
    """$PRUNEDM_CACHE_DIR/nvrtc, else ~/.cache/prunedm/nvrtc."""
    base = os.environ.get(ENV_CACHE_DIR)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "prunedm") / "nvrtc"


def _target(binding, arch: int) -> tuple[str, str]:
    """(--gpu-architecture value, image suffix): a cubin for `arch` when this NVRTC knows it, else PTX for
    the newest arch it knows below (the driver JIT-compiles it)."""
    try:
        supported = [int(a) for a in binding.getSupportedArchs()]
    except AttributeError:  # old binding: assume it knows the arch
        return f"sm_{arch}", "cubin"
    if arch in supported or not any(a <= arch for a in supported):
        return f"sm_{arch}", "cubin"
    return f"compute_{max(a for a in supported if a <= arch)}", "ptx"


_FALLBACK_ROOT: Path | None = None  # a private temp dir when the cache dir cannot be written


def _store(directory: Path, files: dict[str, bytes]) -> Path:
    """Write files (name -> bytes) whole into `directory` and return where they went: `directory`, or, when it
    cannot be written (read-only home, wrong owner), the same key under a temp dir of this process, with one
    warning. A cache that cannot be kept never stops the kernels from running."""
    global _FALLBACK_ROOT
    try:
        for name, data in files.items():
            write_bytes_atomic(directory / name, data)
        return directory
    except OSError as exc:
        if _FALLBACK_ROOT is None:
            _FALLBACK_ROOT = Path(tempfile.mkdtemp(prefix="prunedm-nvrtc-"))
            warnings.warn(
                f"prunedm NVRTC cache {directory.parent} cannot be written ({exc}); the compiled kernels are kept "
                f"in {_FALLBACK_ROOT} for this process only (set {ENV_CACHE_DIR} to a writable dir to keep them)",
                stacklevel=4,
            )
        fallback = _FALLBACK_ROOT / directory.name
        for name, data in files.items():
            write_bytes_atomic(fallback / name, data)
        return fallback


def _nvrtc_compile(binding, source: str, options: tuple[str, ...], image: str) -> tuple[bytes, dict[str, str]]:
    """Compile with NVRTC's API: (cubin or PTX bytes, {name expression: lowered name})."""
    prog = binding.createProgram(source, "prunedm_nvrtc_entry.cu", (), ())
    try:
        for name in KERNELS.values():
            binding.addNameExpression(prog, name)
        try:
            binding.compileProgram(prog, options)
        except Exception as exc:
            try:
                log = binding.getProgramLog(prog)
            except Exception:
                log = ""
            raise _compile_error(f"{exc}\n{log}", options) from exc
        data = binding.getCUBIN(prog) if image == "cubin" else binding.getPTX(prog)
        data = data.encode() if isinstance(data, str) else bytes(data)
        lowered = {name: str(binding.getLoweredName(prog, name)) for name in KERNELS.values()}
    finally:
        binding.destroyProgram(prog)
    return data, lowered


def _compile_error(log: str, options) -> RuntimeError:
    hint = ""
    if "cuda_fp16.h" in log or "cuda_bf16.h" in log:
        hint = (
            "\nNVRTC cannot find cuda_fp16.h/cuda_bf16.h: set CUDA_PATH to a CUDA toolkit (its include/ holds "
            "them), or `pip install nvidia-cuda-runtime-cu12` (cu13: nvidia-cuda-runtime) next to cupy"
        )
    return RuntimeError(f"prunedm: NVRTC failed to compile the sparse kernels (options {list(options)}):\n{log}{hint}")


def load_kernels(device_index: int, arch: int) -> dict:
    """{name expression: cupy kernel} for the GPU `device_index` of compute capability `arch` (e.g. 80),
    compiled on first use and then read from the disk cache (and kept in memory for the process)."""
    cupy = _cupy()
    binding = _nvrtc_binding(cupy)
    source = assemble_source()
    target, image = _target(binding, arch)
    includes = cuda_include_dirs()
    include_options = tuple(f"-I{d}" for d in includes)
    options = (*COMMON_OPTIONS, f"--gpu-architecture={target}", *include_options)
    try:
        nvrtc_version = ".".join(str(v) for v in binding.getVersion())
    except AttributeError:
        nvrtc_version = "?"
    key_fields = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "options": list(options),
        "arch": arch,
        "cupy": str(getattr(cupy, "__version__", "?")),
        "nvrtc": nvrtc_version,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    with _LOCK:
        loaded = _LOADED.get((device_index, key))
        if loaded is not None:
            return loaded
        directory = cache_root() / key
        manifest_path, image_path = directory / "manifest.json", directory / f"kernels.{image}"
        lowered = _read_manifest(manifest_path, image_path, key_fields)
        if lowered is None and _FALLBACK_ROOT is not None:  # compiled earlier in this process, cache unwritable
            image_path = _FALLBACK_ROOT / key / image_path.name
            lowered = _read_manifest(image_path.with_name(manifest_path.name), image_path, key_fields)
            if lowered is None:
                image_path = directory / image_path.name
        if lowered is None:
            needed = ("createProgram", "addNameExpression", "compileProgram", "getLoweredName", "destroyProgram")
            if not all(hasattr(binding, f) for f in needed):
                # This cupy's NVRTC binding is not the one we know: let cupy compile (and cache) it.
                names = list(KERNELS.values())  # cupy adds the arch option itself
                with cupy.cuda.Device(device_index):
                    module = cupy.RawModule(
                        code=source, options=COMMON_OPTIONS + include_options, name_expressions=names
                    )
                    loaded = {name: module.get_function(name) for name in KERNELS.values()}
                _LOADED[(device_index, key)] = loaded
                return loaded
            data, lowered = _nvrtc_compile(binding, source, options, image)
            manifest = {**key_fields, "image": image_path.name, "lowered_names": lowered}
            # The image first: a manifest is only ever beside a complete image.
            files = {
                image_path.name: data,
                manifest_path.name: (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(),
            }
            image_path = _store(directory, files) / image_path.name
        # A module loads into the current CUDA context: make it the GPU the kernels will run on.
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(path=str(image_path))
            loaded = {name: module.get_function(lowered[name]) for name in KERNELS.values()}
        _LOADED[(device_index, key)] = loaded
        return loaded


def _read_manifest(manifest_path: Path, image_path: Path, key_fields: dict) -> dict[str, str] | None:
    """The cached lowered names when the manifest matches key_fields and the image is there, else None."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):  # missing, unreadable or garbage: compiled again and rewritten
        return None
    if not isinstance(manifest, dict):
        return None
    if any(manifest.get(k) != v for k, v in key_fields.items()) or not image_path.is_file():
        return None
    lowered = manifest.get("lowered_names")
    if not isinstance(lowered, dict) or set(lowered) != set(KERNELS.values()):
        return None
    if not all(isinstance(name, str) and name for name in lowered.values()):
        return None
    return lowered


def clear_loaded() -> None:
    """Forget the kernels loaded in this process (the disk cache stays)."""
    with _LOCK:
        _LOADED.clear()


# -- launching ------------------------------------------------------------------------------------------


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """t itself when its data is 16-byte aligned (the kernels copy 16-byte chunks), else an aligned copy."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_cuda(op: str, input: torch.Tensor) -> int:
    """The device's arch (e.g. 80) after checking what the kernels need; raises otherwise."""
    if input.device.type != "cuda":
        raise ValueError(f"{op}: the nvrtc backend runs CUDA tensors, got {input.device}")
    if input.dtype not in _CUDA_TYPES:
        raise TypeError(
            f"{op}: the CUDA kernel takes float16 or bfloat16 tensors, got {input.dtype}; "
            "use backend='reference' (prunedm.ops) for float32"
        )
    major, minor = device_capability(input.device)
    if major < 8:
        raise RuntimeError(f"{op}: mma.sp needs compute capability >= 8.0 (Sparse Tensor Cores), got {major}.{minor}")
    return 10 * major + minor


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device; a seam the tests replace."""
    return torch.cuda.get_device_capability(device)


def current_stream_ptr(device: torch.device) -> int:
    """torch's current stream on `device` as a raw cudaStream_t; a seam the tests replace."""
    return torch.cuda.current_stream(device).cuda_stream


def make_params(values, meta, b, bias, residual, out, m, p, k, activation, res, conv=None) -> np.ndarray:
    """Params<T> for one launch as a size-1 structured array (cupy passes it by value, 248 bytes);
    res: the six ResidualLayout fields, conv: the 14 ConvGeometry fields or None."""
    params = np.zeros(1, dtype=PARAMS_DTYPE)
    for name, t in zip(_POINTERS, (values, meta, b, bias, residual, out)):
        params[name] = 0 if t is None else t.data_ptr()
    params["m"], params["p"], params["k"], params["activation"] = m, p, k, activation
    for name, v in zip(_RES_FIELDS, res):
        params[f"res_{name}"] = v
    for name, v in zip(_CONV_FIELDS, conv or (0,) * len(_CONV_FIELDS)):
        params[f"conv_{name}"] = v
    return params


def launch_geometry(m: int, p: int) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """(grid, block, dynamic shared memory bytes) of launch_sparse_gemm for out [P, M]."""
    return ((p + BLOCK_N - 1) // BLOCK_N, (m + BLOCK_M - 1) // BLOCK_M, 1), (THREADS, 1, 1), DYNAMIC_SMEM_BYTES


def device_index(device: torch.device) -> int | None:
    """The CUDA device index of a tensor's device ("cuda" alone means torch's current device)."""
    if device.type == "cuda" and device.index is None:
        return torch.cuda.current_device()
    return device.index


def _launch(op: str, input: torch.Tensor, conv: bool, params: np.ndarray, m: int, p: int, arch: int) -> None:
    cupy = _cupy()
    index = device_index(input.device)
    grid, block, smem = launch_geometry(m, p)
    # Loaded and launched on the tensor's GPU, whichever is current (a kernel loaded on another GPU's
    # context cannot run here).
    with cupy.cuda.Device(index):
        kernel = load_kernels(index, arch)[KERNELS[(input.dtype, conv)]]
        with cupy.cuda.ExternalStream(current_stream_ptr(input.device)):
            kernel(grid, block, (params,), shared_mem=smem)


def sparse_linear_2to4(input, values, meta, bias=None, activation="none", residual=None) -> torch.Tensor:
    """sparse_linear_2to4 (prunedm.ops) on the NVRTC-compiled kernel: same arguments, checks and result
    as torch.ops.prunedm.sparse_linear_2to4 on CUDA."""
    op = "sparse_linear_2to4"
    rows, k = _checks.check_sparse_linear(input, values, meta, bias, activation, residual)
    arch = _check_cuda(op, input)
    values, meta = _aligned16(values.contiguous()), _aligned16(meta.contiguous())
    out_shape = [*input.shape[:-1], rows]
    x = _aligned16(input.reshape(-1, k).contiguous())
    tokens = x.shape[0]
    out = torch.empty(out_shape, dtype=input.dtype, device=input.device)
    if tokens == 0:
        return out
    holder, res = None, (1, 1, 0, 0, 0, 0)
    if residual is not None:
        holder = residual.expand(out_shape).reshape(tokens, rows)
        res = (1, 1, holder.stride(0), holder.stride(1), 0, 0)
    bias = bias.contiguous() if bias is not None else None
    activation_code = _checks.ACTIVATIONS.index(activation)
    params = make_params(values, meta, x, bias, holder, out, rows, tokens, k, activation_code, res)
    _launch(op, input, False, params, rows, tokens, arch)
    return out


def sparse_conv2d_2to4(
    input, values, meta, weight_shape, bias=None, stride=1, padding=0, dilation=1, activation="none", residual=None
) -> torch.Tensor:
    """sparse_conv2d_2to4 (prunedm.ops) on the NVRTC-compiled implicit-GEMM kernel: same arguments, checks
    and result (memory format included) as torch.ops.prunedm.sparse_conv2d_2to4 on CUDA."""
    op = "sparse_conv2d_2to4"
    shape, stride, padding, dilation, (out_h, out_w) = _checks.check_sparse_conv(
        input, values, meta, weight_shape, bias, stride, padding, dilation, activation, residual
    )
    arch = _check_cuda(op, input)
    cout, cin, kh, kw = shape
    alignment = _checks.CONV_CHANNEL_ALIGNMENT
    if cin % alignment:
        raise ValueError(
            f"{op}: the CUDA kernel needs input channels (Cin = {cin}) to be a multiple of {alignment} "
            "(16-byte NHWC gathers); use backend='reference' (prunedm.ops) for this layer"
        )
    values, meta = _aligned16(values.contiguous()), _aligned16(meta.contiguous())
    x = _aligned16(input.contiguous(memory_format=torch.channels_last))
    batch, _, in_h, in_w = input.shape
    out = torch.empty(batch, out_h, out_w, cout, dtype=input.dtype, device=input.device).permute(0, 3, 1, 2)
    holder, res = None, (out_h, out_w, 0, 0, 0, 0)
    if residual is not None:
        holder = residual.expand(batch, cout, out_h, out_w)
        res = (out_h, out_w, *holder.stride())
    bias = bias.contiguous() if bias is not None else None
    geometry = (batch, cin, in_h, in_w, kh, kw, *stride, *padding, *dilation, out_h, out_w)
    p = batch * out_h * out_w
    params = make_params(
        values, meta, x, bias, holder, out, cout, p, kh * kw * cin, _checks.ACTIVATIONS.index(activation), res, geometry
    )
    if p:
        _launch(op, input, True, params, cout, p, arch)
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    return out if channels_last else out.contiguous()
