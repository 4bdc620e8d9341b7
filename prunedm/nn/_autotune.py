"""backend="auto": time each eligible forward path of a sparse layer once per shape and keep the fastest.

Decisions are keyed by (torch + prunedm versions, device name + capability, layer signature, input
signature with the batch bucket) and cached in memory and in one JSON file shared by processes."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from prunedm._atomic import write_text_atomic
from prunedm.measure import batch_ms

CACHE_FORMAT = "prunedm.autotune"
CACHE_VERSION = 1
CACHE_FILENAME = f"autotune-v{CACHE_VERSION}.json"
ENV_CACHE_DIR = "PRUNEDM_CACHE_DIR"
ENV_AUTOTUNE = "PRUNEDM_AUTOTUNE"
# A sparse path is picked only when it beats dense by more than max(MIN_ADVANTAGE, NOISE_FACTOR x the
# measured noise), so that timing noise never makes a layer slower than dense.
MIN_ADVANTAGE = 0.05
NOISE_FACTOR = 3.0
WARMUP_CALLS = 3
# One measurement times enough back-to-back launches to last this long (launch overhead and timer
# resolution then amortise), at most MAX_LAUNCHES; each path is measured SAMPLES times, median kept.
BATCH_TARGET_MS = {"cuda": 2.0, "cpu": 5.0}
MAX_LAUNCHES = 1000
SAMPLES = {"cuda": 7, "cpu": 5}
_PATHS = ("dense", "torch", "prunedm")


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
    from prunedm._version import __version__

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    else:
        import platform

        where = f"{device.type} {platform.machine()} threads={torch.get_num_threads()}"
    return f"torch={torch.__version__};prunedm={__version__};device={where}"


def measure_samples_ms(fn: Callable[[], object], device: torch.device, path: str = "") -> list[float]:
    """Per-call latencies of fn() in ms, one per measurement, after a warm-up. Each measurement is a batch
    of back-to-back calls long enough to last BATCH_TARGET_MS (so ~10 us layers are not measured as launch
    overhead plus a host sync); the spread of the samples is the noise auto compares against.

    `path` names what fn runs ("dense", "torch", "prunedm"); a fake timer in tests keys on it."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    for _ in range(WARMUP_CALLS):
        fn()
    if kind == "cuda":
        torch.cuda.synchronize(device)
    launches, target = 1, BATCH_TARGET_MS[kind]
    while launches < MAX_LAUNCHES:
        elapsed = batch_ms(fn, device, launches)
        if elapsed >= target:
            break
        # Grow towards the target (x2 at least, x16 at most per step: a first call may be slow).
        grow = min(16.0, max(2.0, target / max(elapsed, 1e-6)))
        launches = min(MAX_LAUNCHES, int(launches * grow))
    return [batch_ms(fn, device, launches) / launches for _ in range(SAMPLES[kind])]


def measure_ms(fn: Callable[[], object], device: torch.device, path: str = "") -> float:
    """Median per-call latency of fn() in ms over batched measurements (measure_samples_ms)."""
    return statistics.median(measure_samples_ms(fn, device, path))


# Tests replace this with a fake; the module looks it up at call time. It returns per-call samples in ms
# (a single number counts as one sample, no noise).
TIMER: Callable[[Callable[[], object], torch.device, str], list[float] | float] = measure_samples_ms


class Timings(dict):
    """{path: median ms} of one timing round, with `noise`: the relative spread (max - min) / median of
    the dense samples, i.e. how far apart two timings of the same thing came out."""

    noise: float = 0.0


def relative_spread(samples: list[float]) -> float:
    """(max - min) / median of repeated timings of one thing: 0 for a single sample."""
    middle = statistics.median(samples)
    return (max(samples) - min(samples)) / middle if middle > 0 else 0.0


def pick_fastest(times_ms: dict[str, float], noise: float | None = None) -> str:
    """The fastest path; "dense" unless a sparse path beats it by more than max(MIN_ADVANTAGE,
    NOISE_FACTOR x noise) (dense is always a candidate). noise defaults to times_ms.noise (Timings)."""
    if "dense" not in times_ms:
        raise ValueError(f"pick_fastest: times_ms must include 'dense', got {sorted(times_ms)}")
    if noise is None:
        noise = getattr(times_ms, "noise", 0.0)
    best = min(times_ms, key=lambda name: (times_ms[name], name != "dense"))
    needed = max(MIN_ADVANTAGE, NOISE_FACTOR * noise)
    if best != "dense" and times_ms[best] > times_ms["dense"] * (1.0 - needed):
        return "dense"
    return best


def time_candidates(candidates: dict[str, Callable[[], object]], device: torch.device) -> tuple[Timings, dict]:
    """Time each candidate (batched, several samples); (Timings {name: median ms} with .noise from the
    dense samples, {name: error}) for those that ran / raised."""
    times, errors = Timings(), {}
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                result = TIMER(fn, device, name)
                samples = [float(result)] if isinstance(result, (int, float)) else [float(v) for v in result]
                if not samples:
                    raise ValueError("the timer returned no samples")
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            times[name] = statistics.median(samples)
            if name == "dense":
                times.noise = relative_spread(samples)
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


def _entry_problem(entry) -> str | None:
    """Why one cache entry cannot be used (wrong types or values), or None."""
    if not isinstance(entry, dict):
        return f"an entry must be an object, got {type(entry).__name__}"
    key = entry.get("input")
    if key is not None and not (
        isinstance(key, list) and 0 < len(key) <= 4 and all(type(v) is int and v >= 0 for v in key)
    ):
        return f"input must be a list of non-negative ints, got {key!r}"
    if "backend" in entry and entry["backend"] not in _PATHS:
        return f"backend must be one of {_PATHS}, got {entry['backend']!r}"
    times = entry.get("times_ms", {})
    if not isinstance(times, dict) or not all(
        name in _PATHS and type(ms) in (int, float) and 0 <= ms < float("inf") for name, ms in times.items()
    ):
        return f"times_ms must map paths to non-negative numbers, got {times!r}"
    cslt = entry.get("cslt")
    if cslt is not None and not (isinstance(cslt, list) and len(cslt) == 3 and all(type(v) is int for v in cslt)):
        return f"cslt must be [alg_id, split_k, split_k_mode] ints, got {cslt!r}"
    return None


_warned_bad: set[tuple[str, int, str]] = set()


def _valid_entries(entries, path: Path) -> dict:
    """The well-formed part of a file's {context: {layer: {input: entry}}}; what is not (edited by hand, or
    written by another version) is dropped with one warning, and timed again when needed."""
    bad: list[str] = []
    clean: dict = {}
    if not isinstance(entries, dict):
        bad.append(f"entries must be an object, got {type(entries).__name__}")
        entries = {}
    for context, layers in entries.items():
        if not isinstance(layers, dict):
            bad.append(f"{context}: must be an object")
            continue
        for layer, inputs in layers.items():
            if not isinstance(inputs, dict):
                bad.append(f"{context} / {layer}: must be an object")
                continue
            for key, entry in inputs.items():
                problem = _entry_problem(entry)
                if problem is not None:
                    bad.append(f"{context} / {layer} / {key}: {problem}")
                else:
                    clean.setdefault(context, {}).setdefault(layer, {})[key] = entry
    # One warning per bad file content, however often it is re-read before it is rewritten.
    if bad and (str(path), len(bad), bad[0]) not in _warned_bad:
        _warned_bad.add((str(path), len(bad), bad[0]))
        warnings.warn(
            f"prunedm autotune cache {path}: ignored {len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'} "
            f"(first: {bad[0]}); they are timed again and rewritten",
            stacklevel=4,
        )
    return clean


def _read(path: Path) -> dict:
    """The file's well-formed entries {context: {layer: {input: entry}}}; {} when missing, unreadable or
    another format. A cache is a cache: nothing in it is ever fatal."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"prunedm autotune cache {path} is unreadable ({exc}); it will be rewritten", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        return {}
    return _valid_entries(data.get("entries", {}), path)


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
                    write_text_atomic(path, text + "\n")
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
