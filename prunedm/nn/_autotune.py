"""backend="auto": time each eligible forward path of a sparse layer once per shape and keep the fastest.

Decisions are keyed by (torch + prunedm versions, device name + capability, layer signature, input
signature with the batch bucket) and cached in memory and in one JSON file shared by processes."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

CACHE_FORMAT = "prunedm.autotune"
CACHE_VERSION = 1
CACHE_FILENAME = f"autotune-v{CACHE_VERSION}.json"
ENV_CACHE_DIR = "PRUNEDM_CACHE_DIR"
ENV_AUTOTUNE = "PRUNEDM_AUTOTUNE"
# A sparse path must beat dense by this factor to be picked, so that timing noise never makes a
# layer slower than dense.
SPARSE_WIN_FACTOR = 0.97
WARMUP_CALLS = 3
TIMED_CALLS = {"cuda": 20, "cpu": 5}


def cache_path() -> Path:
    """The autotune cache file: $PRUNEDM_CACHE_DIR/autotune-v1.json, else ~/.cache/prunedm/autotune-v1.json."""
    base = os.environ.get(ENV_CACHE_DIR)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "prunedm"
    return root / CACHE_FILENAME


def timing_enabled() -> bool:
    """False when PRUNEDM_AUTOTUNE=0 (or off/false/no): auto then takes "torch" where eligible, without timing."""
    return os.environ.get(ENV_AUTOTUNE, "1").strip().lower() not in ("0", "off", "false", "no")


def batch_bucket(rows: int) -> int:
    """The next power of two >= rows (the GEMM's flattened batch rows): one decision per bucket."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ValueError(f"batch_bucket: rows must be a non-negative int, got {rows!r}")
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


def context_key(device: torch.device) -> str:
    """What a timing is valid for besides the shape: torch and prunedm versions and the device."""
    from prunedm import __version__

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    else:
        import platform

        where = f"{device.type} {platform.machine()} threads={torch.get_num_threads()}"
    return f"torch={torch.__version__};prunedm={__version__};device={where}"


def measure_ms(fn: Callable[[], object], device: torch.device, path: str = "") -> float:
    """Median latency of fn() in ms after a warm-up (CUDA events on CUDA, perf_counter elsewhere).

    `path` names what fn runs ("dense", "torch", "prunedm"); a fake timer in tests keys on it."""
    repeats = TIMED_CALLS.get(device.type, TIMED_CALLS["cpu"])
    for _ in range(WARMUP_CALLS):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# Tests replace this with a fake; the module looks it up at call time.
TIMER: Callable[[Callable[[], object], torch.device, str], float] = measure_ms


def pick_fastest(times_ms: dict[str, float]) -> str:
    """The fastest path; "dense" unless a sparse path beats it by SPARSE_WIN_FACTOR (dense is always a candidate)."""
    if "dense" not in times_ms:
        raise ValueError(f"pick_fastest: times_ms must include 'dense', got {sorted(times_ms)}")
    best = min(times_ms, key=lambda name: (times_ms[name], name != "dense"))
    if best != "dense" and times_ms[best] > times_ms["dense"] * SPARSE_WIN_FACTOR:
        return "dense"
    return best


def time_candidates(candidates: dict[str, Callable[[], object]], device: torch.device) -> tuple[dict, dict]:
    """Time each candidate once (warm-up included); ({name: ms}, {name: error}) for those that ran / raised."""
    times, errors = {}, {}
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                times[name] = float(TIMER(fn, device, name))
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
    return times, errors


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock beside `path` (POSIX flock); a no-op where flock is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: tmp + os.replace still keeps the file whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    """The file's entries {context: {layer: {input: entry}}}; {} when missing, unreadable or another format."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"prunedm autotune cache {path} is unreadable ({exc}); it will be rewritten", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _merge(into: dict, new: dict) -> dict:
    """Merge nested {context: {layer: {input: entry}}} dicts; entries of `new` update those of `into`."""
    for context, layers in new.items():
        for layer, inputs in layers.items():
            for key, entry in inputs.items():
                slot = into.setdefault(context, {}).setdefault(layer, {})
                slot[key] = {**slot.get(key, {}), **entry}
    return into


class AutotuneCache:
    """Decisions in memory, persisted to cache_path(): each write re-reads the file under a lock,
    merges its own entries in and replaces the file atomically, so concurrent processes add up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, path: Path | None) -> None:
        self._path = path
        self._entries: dict = {}
        self._mtime_ns: int | None = None
        self.hits = self.misses = self.timed = self.writes = 0

    def _sync(self) -> Path:
        """Follow $PRUNEDM_CACHE_DIR, and re-read the file when another process changed it."""
        path = cache_path()
        if path != self._path:
            self._reset(path)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime is not None and mtime != self._mtime_ns:
            self._entries = _merge(_read(path), self._entries)
            self._mtime_ns = mtime
        return path

    def layer_entries(self, context: str, layer: str) -> dict[str, dict]:
        """{input signature: entry} known for one layer signature on one context (a copy)."""
        with self._lock:
            self._sync()
            return {k: dict(v) for k, v in self._entries.get(context, {}).get(layer, {}).items()}

    def get(self, context: str, layer: str, key: str) -> dict | None:
        """The entry for one (context, layer, input) or None; counts a hit or a miss."""
        with self._lock:
            self._sync()
            entry = self._entries.get(context, {}).get(layer, {}).get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            return dict(entry)

    def put(self, context: str, layer: str, key: str, entry: dict, timed: bool = False) -> None:
        """Record an entry (merged into any existing one) in memory and on disk."""
        if not isinstance(entry, dict):
            raise TypeError(f"AutotuneCache.put: entry must be a dict, got {type(entry).__name__}")
        with self._lock:
            path = self._sync()
            mine = {context: {layer: {key: entry}}}
            _merge(self._entries, mine)
            self.timed += int(timed)
            try:
                with _file_lock(path):
                    on_disk = _merge(_read(path), mine)
                    text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": on_disk}, indent=1)
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
                    with os.fdopen(fd, "w") as f:
                        f.write(text + "\n")
                    os.replace(tmp, path)
                    self._mtime_ns = path.stat().st_mtime_ns
                    self._entries = _merge(on_disk, self._entries)
                self.writes += 1
            except OSError as exc:  # a read-only home: the in-memory decision still holds for this process
                warnings.warn(f"prunedm autotune cache {path} could not be written ({exc})", stacklevel=3)

    def clear(self, disk: bool = True) -> None:
        """Forget every decision in memory and, with disk=True, delete the cache file."""
        with self._lock:
            path = cache_path()
            if disk:
                with _file_lock(path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            self._reset(path)
            self._mtime_ns = None
            if not disk:
                # Keep ignoring the file's current contents until it changes again.
                with contextlib.suppress(OSError):
                    self._mtime_ns = path.stat().st_mtime_ns

    def info(self) -> dict:
        """Where the cache lives and what it holds."""
        with self._lock:
            path = self._sync()
            decisions = sum(
                1 for layers in self._entries.values() for inputs in layers.values() for e in inputs.values()
                if "backend" in e
            )  # fmt: skip
            return {
                "path": str(path),
                "exists": path.exists(),
                "timing_enabled": timing_enabled(),
                "contexts": sorted(self._entries),
                "decisions": decisions,
                "layers": sum(len(layers) for layers in self._entries.values()),
                "hits": self.hits,
                "misses": self.misses,
                "timed": self.timed,
                "writes": self.writes,
            }


CACHE = AutotuneCache()


def autotune_cache_info() -> dict:
    """The auto backend's decision cache: path, whether timing is on (PRUNEDM_AUTOTUNE), counts of
    decisions, hits, misses and timings in this process."""
    return CACHE.info()


def clear_autotune_cache(disk: bool = True) -> None:
    """Forget auto's timing decisions (in memory, and the JSON file unless disk=False).

    Layers already run keep their decisions until they are moved or prepare() is called again."""
    CACHE.clear(disk=disk)
