"""What every benchmark row records: device, versions, git commit; atomic JSON/CSV output and plots. The timer
is prunedm.measure.time_ms."""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from prunedm._atomic import atomic_file, write_text_atomic
from prunedm.ops import extension_info

# Weight matrices (out, in) of real models that the op benchmarks run on: DiT-XL/2 (hidden 1152)
# and the SD 1.5 UNet (320..1280 channels; a 3x3 conv as its [Cout, 9*Cin] GEMM matrix).
WEIGHT_SHAPES = {
    "dit-xl2.qkv": (3456, 1152),
    "dit-xl2.mlp_in": (4608, 1152),
    "dit-xl2.mlp_out": (1152, 4608),
    "sd15.attn_640": (640, 640),
    "sd15.ff_1280": (10240, 1280),
    "sd15.conv3x3_320": (320, 2880),
}

# Peak DRAM bandwidth (GB/s) of GPUs whose properties do not report it.
KNOWN_BANDWIDTH_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}


def _own_tree() -> Path | None:
    """The root of the source checkout this file belongs to (an editable install), or None.

    Only a directory whose bench/common.py is this very file counts: a wheel installed inside some
    other checkout (a venv in a project) must not report that project's commit, nor the cwd's."""
    here = Path(__file__).resolve()
    for root in here.parents:
        candidate = root / "bench" / "common.py"
        if candidate.exists() and candidate.resolve() == here and (root / ".git").exists():
            return root
    return None


def _git_dirs(root: Path) -> tuple[Path, Path] | None:
    """(git dir, common dir) of the checkout at `root`; a worktree's .git is a file naming its git dir."""
    dot_git = root / ".git"
    if dot_git.is_file():
        text = dot_git.read_text(errors="replace").strip()
        if not text.startswith("gitdir:"):
            return None
        git_dir = Path(text.removeprefix("gitdir:").strip())
        git_dir = git_dir if git_dir.is_absolute() else (root / git_dir)
    else:
        git_dir = dot_git
    common = git_dir
    if (git_dir / "commondir").is_file():
        common = git_dir / (git_dir / "commondir").read_text(errors="replace").strip()
    return git_dir, common


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


def _resolve_ref(git_dir: Path, common: Path, ref: str) -> str | None:
    if not ref.startswith("refs/") or ".." in ref:
        return None
    for base in (git_dir, common):
        file = base / ref
        if file.is_file():
            value = file.read_text(errors="replace").strip()
            return value if _is_sha(value) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(errors="replace").splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref and _is_sha(sha):
                return sha
    return None


def head_commit(root: Path) -> str | None:
    """The full HEAD commit of the checkout at `root`, read from .git/HEAD, refs and packed-refs: no git
    process, so no repository config (core.fsmonitor, hooks, filters) can run anything."""
    dirs = _git_dirs(root)
    if dirs is None or not (dirs[0] / "HEAD").is_file():
        return None
    head = (dirs[0] / "HEAD").read_text(errors="replace").strip()
    if head.startswith("ref:"):
        return _resolve_ref(*dirs, head.removeprefix("ref:").strip())
    return head if _is_sha(head) else None


def _is_dirty(root: Path) -> bool:
    # Only prunedm's own checkout, with the config keys that run commands switched off, read-only (no index lock).
    command = ["git", "-c", "core.fsmonitor=", "-c", "core.hooksPath=/dev/null", "--no-optional-locks"]
    command += ["-C", str(root), "status", "--porcelain", "--untracked-files=no"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def git_commit() -> str:
    """The short HEAD commit of prunedm's own source checkout (+dirty), never the cwd's; "unknown"
    for an installed wheel or anything unreadable."""
    root = _own_tree()
    try:
        sha = None if root is None else head_commit(root)
    except OSError:
        sha = None
    if sha is None:
        return "unknown"
    return sha[:7] + ("+dirty" if _is_dirty(root) else "")


def bench_parser(doc: str, name: str, quick: str) -> argparse.ArgumentParser:
    """The argument parser every `python -m bench.<name>` starts from: `doc` as its help, --out (a directory for
    <name>.json and <name>.csv, default bench/out), --device auto|cpu|cuda (resolve_device) and --quick."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out", help=f"directory for {name}.json and {name}.csv")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help=quick)
    return parser


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device: auto is cuda when one is visible, else cpu; cuda needs one visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def environment(device: torch.device) -> dict:
    """Versions, git commit, date and the device (GPU name + capability, or cpu with its thread count)."""
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    """The GPU's peak DRAM bandwidth in GB/s (from its properties or KNOWN_BANDWIDTH_GBPS); None on CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    return next((bw for name, bw in KNOWN_BANDWIDTH_GBPS.items() if name in props.name), None)


def write_results(out_dir: str | os.PathLike, name: str, env: dict, rows: list[dict]) -> tuple[Path, Path]:
    """Write DIR/name.json ({environment, rows}) and DIR/name.csv (rows with the environment columns)."""
    out = Path(out_dir)
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"
    write_text_atomic(json_path, json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    flat = [{**row, **{f"env_{k}": v for k, v in env.items()}} for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    write_text_atomic(csv_path, buf.getvalue())
    return json_path, csv_path


def op_backends(device: torch.device) -> list[str]:
    """The compiled backends an op benchmark times against its baseline on `device`: extension where built,
    triton on CUDA where usable."""
    info = extension_info()
    names = []
    if info["cuda" if device.type == "cuda" else "cpu"]["built"]:
        names.append("extension")
    if device.type == "cuda" and info["triton"]["usable"]:
        names.append("triton")
    return names


def op_row(
    op: str, shape: str, dtype: torch.dtype, backend: str, timing: dict, baseline: dict | None, moved_bytes: float,
    device: torch.device, bandwidth_gbps: float | None,
) -> dict:  # fmt: skip
    """One op-benchmark row: the timing, the speedup over the baseline row (1.0 for the baseline itself) and,
    on CUDA, peak memory, achieved GB/s for `moved_bytes` and its fraction of the peak bandwidth."""
    r = {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "backend": backend, **timing}
    r["speedup_vs_baseline"] = baseline["median_ms"] / timing["median_ms"] if baseline else 1.0
    r["baseline"] = baseline["backend"] if baseline else backend
    if device.type == "cuda":
        r["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        r["achieved_gbps"] = moved_bytes / (timing["median_ms"] * 1e-3) / 1e9
        r["bandwidth_fraction"] = r["achieved_gbps"] / bandwidth_gbps if bandwidth_gbps else None
    return r


def plot_speedups(rows: list[dict], path: str | os.PathLike, value: str, label: str, title: str) -> Path | None:
    """Horizontal bars of rows[value] (a speedup, 1.0 = baseline) per (label, backend), saved as PNG.

    Returns None when matplotlib is missing (the JSON/CSV still hold every number)."""
    plt = _pyplot()
    if plt is None:
        return None
    shown = [r for r in rows if r.get(value) is not None]
    if not shown:
        return None
    names = [f"{r[label]} [{r.get('backend', '')}]" for r in shown]
    values = [float(r[value]) for r in shown]
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(shown) + 1.5))
    ax.barh(range(len(shown)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{value} (1.0 = baseline, same run)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """fig laid out and written to path as a PNG, whole or not at all; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_lines(
    series: dict[str, list[tuple[float, float]]], path: str | os.PathLike, xlabel: str, ylabel: str, title: str
) -> Path | None:
    """One line per series name through its (x, y) points, log-2 x axis, saved as PNG (None without matplotlib)."""
    plt = _pyplot()
    shown = {name: sorted(points) for name, points in series.items() if points}
    if plt is None or not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in shown.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_bars(values: dict[str, float], path: str | os.PathLike, xlabel: str, title: str) -> Path | None:
    """Horizontal bars of {label: value}, saved as PNG (None without matplotlib or values)."""
    plt = _pyplot()
    shown = {k: float(v) for k, v in values.items() if v is not None}
    if plt is None or not shown:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(shown) + 1.5))
    ax.barh(range(len(shown)), list(shown.values()), color="tab:blue")
    ax.set_yticks(range(len(shown)), list(shown), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
