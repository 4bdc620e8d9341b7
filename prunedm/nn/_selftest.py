"""Kernel self-test and quarantine: on first use per GPU and build, prunedm's own sparse kernels run small cases in a
child process against the reference; one that fails, crashes or hangs is never chosen (`prunedm selftest`: main())."""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from prunedm._atomic import write_text_atomic
from prunedm.nn import _autotune

CACHE_FORMAT = "prunedm.selftest"
CACHE_VERSION = 1
CACHE_FILENAME = f"selftest-v{CACHE_VERSION}.json"
ENV_SELFTEST = "PRUNEDM_SELFTEST"  # "0": trust the kernels untested (never quarantine)
ENV_TIMEOUT = "PRUNEDM_SELFTEST_TIMEOUT"
# A cold child imports torch, initialises CUDA and (nvrtc) may compile the kernels: minutes at worst.
DEFAULT_TIMEOUT_S = 300.0
KERNELS = ("sparse_linear_2to4", "sparse_conv2d_2to4")
STATUSES = ("pass", "fail", "crash", "hang")

_LOCK = threading.Lock()
_RESULTS: dict[tuple[str, str], dict] = {}  # (identity, kernel) -> {"status", "detail", "tested_at"}
_BUILD_HASHES: dict[str, str] = {}
_IDENTITIES: dict[tuple[str, str], str] = {}
_warned_bad: set[str] = set()


def enabled() -> bool:
    """False when PRUNEDM_SELFTEST=0 (or off/false/no): kernels are used untested."""
    return os.environ.get(ENV_SELFTEST, "1").strip().lower() not in ("0", "off", "false", "no")


def timeout_s() -> float:
    try:
        value = float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def cache_path() -> Path:
    """selftest-v1.json beside the autotune cache ($PRUNEDM_CACHE_DIR, else ~/.cache/prunedm)."""
    return _autotune.cache_path().with_name(CACHE_FILENAME)


# -- seams the fake-GPU tests replace ----------------------------------------------------------------------


def device_available() -> bool:
    return torch.cuda.is_available()


def device_count() -> int:
    return torch.cuda.device_count()


def driver_version() -> str:
    """The CUDA driver's version (e.g. "13.0"), read from libcuda; "?" when it cannot be read."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return "?"
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return "?"


def build_hash(implementation: str) -> str:
    """What identifies the kernels' code: the extension library's bytes, or the NVRTC source and cupy version."""
    if implementation not in _BUILD_HASHES:
        digest = hashlib.sha256(implementation.encode())
        if implementation == "extension":
            from prunedm import _ext

            module = _ext._load()[0]
            path = getattr(module, "__file__", None)
            digest.update(Path(path).read_bytes() if path and Path(path).is_file() else b"?")
        elif implementation == "nvrtc":
            from prunedm.ops import _nvrtc

            digest.update(_nvrtc.assemble_source().encode() + _nvrtc.status()[2].encode())
        _BUILD_HASHES[implementation] = digest.hexdigest()[:16]
    return _BUILD_HASHES[implementation]


def device_identity(device: torch.device, implementation: str) -> str:
    """The key a result holds for: GPU name, compute capability, driver, and the kernels' build hash
    (worked out once per device and implementation: every layer's prepare() asks)."""
    memo = (str(device), implementation)
    if memo not in _IDENTITIES:
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        build = build_hash(implementation)
        _IDENTITIES[memo] = f"{name} sm_{major}{minor} driver={driver_version()} {implementation}={build}"
    return _IDENTITIES[memo]


def run_child(argv: list[str], timeout: float) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr) of a child process; exit code None when it ran past `timeout` (killed)."""
    env = {**os.environ, ENV_SELFTEST: "0"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return None, out, err
    return done.returncode, done.stdout, done.stderr


# -- the cache -----------------------------------------------------------------------------------------------


def _valid(entries, path: Path) -> dict:
    """The well-formed part of the file's {identity: {kernel: result}}; the rest is dropped with one warning."""
    clean, bad = {}, []
    for identity, kernels in (entries if isinstance(entries, dict) else {"?": None}).items():
        if not isinstance(kernels, dict):
            bad.append(identity)
            continue
        for kernel, result in kernels.items():
            if (
                isinstance(result, dict)
                and result.get("status") in STATUSES
                and isinstance(result.get("detail", ""), str)
            ):
                clean.setdefault(identity, {})[kernel] = result
            else:
                bad.append(f"{identity} / {kernel}")
    if bad and f"{path}:{bad[0]}" not in _warned_bad:
        _warned_bad.add(f"{path}:{bad[0]}")
        warnings.warn(
            f"prunedm self-test cache {path}: ignored malformed entries ({bad[0]}); tested again", stacklevel=4
        )
    return clean


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if str(path) not in _warned_bad:
            _warned_bad.add(str(path))
            warnings.warn(f"prunedm self-test cache {path} is unreadable ({exc}); it will be rewritten", stacklevel=4)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        return {}
    return _valid(data.get("entries", {}), path)


def _write(identity: str, kernel: str, result: dict) -> None:
    path = cache_path()
    try:
        with _autotune._file_lock(path):
            entries = _read(path)
            entries.setdefault(identity, {})[kernel] = result
            text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}, indent=1)
            write_text_atomic(path, text + "\n")
    except OSError as exc:  # a read-only home: the result still holds for this process
        warnings.warn(f"prunedm self-test cache {path} could not be written ({exc})", stacklevel=4)


# -- testing a kernel ---------------------------------------------------------------------------------------


def _child_argv(kernel: str, implementation: str, index: int) -> list[str]:
    return [sys.executable, "-m", "prunedm.nn._selftest", "--child", kernel, implementation, str(index)]


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _test_in_child(kernel: str, implementation: str, index: int) -> dict:
    limit = timeout_s()
    started = time.perf_counter()
    code, out, err = run_child(_child_argv(kernel, implementation, index), limit)
    seconds = round(time.perf_counter() - started, 3)
    report = _last_json(out)
    tail = (err.strip().splitlines() or [""])[-1][:300]
    if code is None:
        status, detail = "hang", f"no result within {limit:g} s (killed)"
    elif code == 0 and report is not None and report.get("ok") is True:
        status, detail = "pass", str(report.get("detail", ""))
    elif code == 1 and report is not None and report.get("ok") is False:
        status, detail = "fail", str(report.get("detail", ""))[:500]
    else:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        status, detail = "crash", f"the child process died ({how}){': ' + tail if tail else ''}"
    return {"status": status, "detail": detail, "seconds": seconds, "tested_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def kernel_result(kernel: str, implementation: str, device, force: bool = False) -> dict:
    """{"status": pass | fail | crash | hang | untested, "detail", "source": memory | cache | tested | off} of
    one kernel on one GPU: remembered, read from the cache, or tested now in a child process."""
    device = torch.device(device)
    if not enabled() and not force:
        return {"status": "untested", "detail": f"{ENV_SELFTEST}=0", "source": "off"}
    index = device.index if device.index is not None else torch.cuda.current_device()
    identity = device_identity(torch.device("cuda", index), implementation)
    with _LOCK:
        if not force:
            known = _RESULTS.get((identity, kernel))
            if known is not None:
                return {**known, "source": "memory"}
            cached = _read(cache_path()).get(identity, {}).get(kernel)
            if cached is not None:
                _RESULTS[(identity, kernel)] = cached
                return {**cached, "source": "cache"}
        result = _test_in_child(kernel, implementation, index)
        _RESULTS[(identity, kernel)] = result
        _write(identity, kernel, result)
        return {**result, "source": "tested"}


def quarantine_problem(kernel: str, implementation: str, device) -> tuple[str, str] | None:
    """(warning key, reason) when `kernel` built as `implementation` failed its self-test on `device`, else None.
    Tested on first use (a child process, once per GPU and build)."""
    result = kernel_result(kernel, implementation, device)
    if result["status"] in ("pass", "untested"):
        return None
    return f"quarantined-{kernel}-{implementation}", (
        f"prunedm's {kernel} kernel ({implementation}) is quarantined on {device}: its self-test gave "
        f"{result['status']} ({result['detail']}); the dense or torch path runs instead "
        "(`prunedm selftest --force` tests it again)"
    )


def forget_results() -> None:
    """Forget the results held in memory (the cache file stays)."""
    with _LOCK:
        _RESULTS.clear()


def run_selftest(force: bool = False) -> list[dict]:
    """Test every own kernel on every visible GPU (cached results unless force=True); one row per kernel:
    {"device", "kernel", "implementation", "status", "detail", "source"}. No GPU: one row saying so."""
    from prunedm.ops import sparse_mm

    if not device_available():
        return [{"device": "-", "kernel": "-", "implementation": "-", "status": "skipped",
                 "detail": "no CUDA device is visible", "source": "-"}]  # fmt: skip
    rows = []
    for index in range(device_count()):
        device = torch.device("cuda", index)
        implementation, reason = sparse_mm.sparse_kernel_backend(device)
        for kernel in KERNELS:
            row = {"device": str(device), "kernel": kernel, "implementation": implementation or "-"}
            if implementation is None:
                row.update(status="skipped", detail=reason, source="-")
            else:
                result = kernel_result(kernel, implementation, device, force=force)
                row.update(status=result["status"], detail=result["detail"], source=result["source"])
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    columns = ("device", "kernel", "implementation", "status", "source", "detail")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns[:-1]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(str(row.get(c, "")).ljust(widths.get(c, 0)) for c in columns).rstrip())
    return "\n".join(lines)


# -- the child: small cases against the reference --------------------------------------------------------------

# (out, K, tokens, activation, bias, residual); K and out multiples of 32 as compress_2to4 packs them.
_LINEAR_CASES = [(32, 32, 1, "none", False, False), (96, 64, 70, "gelu", True, True),
                 (64, 128, 5, "relu", True, False), (128, 64, 130, "silu", False, True)]  # fmt: skip
# (Cout, Cin, kh, kw, stride, padding, dilation, batch, H, W, channels_last, activation, bias, residual)
_CONV_CASES = [(32, 32, 3, 3, 1, 1, 1, 2, 9, 9, False, "none", True, False),
               (64, 32, 1, 1, 1, 0, 1, 1, 5, 7, True, "relu", False, False),
               (32, 8, 2, 2, 2, 1, 2, 2, 11, 10, True, "silu", True, True)]  # fmt: skip


def _packed(rows: int, cols: int, dtype: torch.dtype, g: torch.Generator):
    from prunedm import ops

    matrix = torch.randn(rows, cols, generator=g)
    matrix = (matrix * ops.nm_mask(matrix)).to(dtype)
    values, meta = ops.compress_2to4(matrix, backend="reference")
    return matrix, values, meta


def _mismatch(got: torch.Tensor, expected: torch.Tensor, what: str) -> str:
    got, expected = got.cpu().float(), expected.float()
    if got.shape != expected.shape:
        return f"{what}: shape {list(got.shape)}, expected {list(expected.shape)}"
    scale = max(1.0, float(expected.abs().max()))
    error = (got - expected).abs().nan_to_num(float("inf"))
    limit = 2e-2 * scale + 2e-2 * expected.abs()
    if bool((error > limit).any()):
        return f"{what}: max error {float(error.max()):.4g} (limit {2e-2 * scale:.3g} + 2% relative)"
    return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # an asynchronous fault surfaces here, inside the child
        torch.cuda.synchronize(device)


def check_kernel(kernel: str, implementation: str, device: torch.device) -> str:
    """Run `kernel` (backend=`implementation`) on small float16/bfloat16 cases; "" when every output matches
    the reference, else what differed first."""
    from prunedm import ops
    from prunedm.ops import reference

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        if kernel == "sparse_linear_2to4":
            for out, k, tokens, activation, has_bias, has_residual in _LINEAR_CASES:
                _, values, meta = _packed(out, k, dtype, g)
                x = torch.randn(tokens, k, generator=g).to(dtype)
                bias = torch.randn(out, generator=g).to(dtype) if has_bias else None
                residual = torch.randn(tokens, out, generator=g).to(dtype) if has_residual else None
                expected = reference.sparse_linear_2to4_ref(x, values, meta, bias, activation, residual)
                moved = [t.to(device) if t is not None else None for t in (x, values, meta, bias, residual)]
                got = ops.sparse_linear_2to4(*moved[:4], activation=activation, residual=moved[4],
                                             backend=implementation)  # fmt: skip
                _sync(device)
                problem = _mismatch(got, expected, f"linear {out}x{k} m={tokens} {activation} {dtype}")
                if problem:
                    return problem
        elif kernel == "sparse_conv2d_2to4":
            for cout, cin, kh, kw, stride, pad, dil, n, h, w, nhwc, activation, has_bias, has_res in _CONV_CASES:
                _, values, meta = _packed(cout, kh * kw * cin, dtype, g)
                x = torch.randn(n, cin, h, w, generator=g).to(dtype)
                if nhwc:
                    x = x.contiguous(memory_format=torch.channels_last)
                bias = torch.randn(cout, generator=g).to(dtype) if has_bias else None
                out_h = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
                out_w = (w + 2 * pad - dil * (kw - 1) - 1) // stride + 1
                residual = torch.randn(n, cout, out_h, out_w, generator=g).to(dtype) if has_res else None
                shape, geometry = (cout, cin, kh, kw), ((stride,) * 2, (pad,) * 2, (dil,) * 2)
                expected = reference.sparse_conv2d_2to4_ref(
                    x, values, meta, shape, bias, *geometry, activation, residual
                )
                moved = [t.to(device) if t is not None else None for t in (x, values, meta, bias, residual)]
                got = ops.sparse_conv2d_2to4(moved[0], moved[1], moved[2], shape, moved[3], stride=stride, padding=pad,
                                             dilation=dil, activation=activation, residual=moved[4],
                                             backend=implementation)  # fmt: skip
                _sync(device)
                problem = _mismatch(got, expected, f"conv {shape} s{stride} p{pad} d{dil} {activation} {dtype}")
                if problem:
                    return problem
        else:
            return f"unknown kernel {kernel!r}"
    return ""


def _child_main(argv: list[str]) -> int:
    """The child's side: one JSON line on stdout ({"ok": bool, "detail": str}); exit 0 when correct, 1 when not."""
    kernel, implementation, index = argv[0], argv[1], int(argv[2])
    try:
        problem = check_kernel(kernel, implementation, torch.device("cuda", index))
    except Exception as exc:  # any error is a failed test, reported to the parent
        problem = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"ok": not problem, "detail": problem}), flush=True)
    return 1 if problem else 0


def main(argv: list[str] | None = None) -> int:
    """`prunedm selftest [--force]`: print the self-test table; exit 1 when a kernel is quarantined."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1:])
    parser = argparse.ArgumentParser(prog="prunedm selftest", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="test again even when a result is cached")
    args = parser.parse_args(argv)
    rows = run_selftest(force=args.force)
    print(format_table(rows))
    return 1 if any(r["status"] in ("fail", "crash", "hang") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
