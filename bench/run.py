"""`prunedm bench`: the op, layer and whole-model benchmarks in one run, written to one directory.

Writes <suite>.json / <suite>.csv per suite (rows + environment: device, versions, git commit),
PNGs (ops speedups, layers speedup by layer, layer latency by batch size, model latency and peak
memory) and bench.json listing what ran. CPU rows say cpu; GPU numbers come only from GPU runs.

    python -m bench.run --out bench/out [--device auto|cpu|cuda] [--quick] [--suite ops,layers,models]"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prunedm._atomic import write_text_atomic

from . import layers as layers_bench
from . import models as models_bench
from . import ops as ops_bench
from .common import environment, plot_bars, plot_lines, plot_speedups, resolve_device, write_results

SUITES = ("ops", "layers", "models")


def _layers_suite(out: Path, device: torch.device, quick: bool, env: dict, models: list[str] | None) -> list[Path]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batches = (1, 4) if quick else layers_bench.BATCHES
    names = models or (["ddpm", "dit"] if quick else ["ddpm", "sd15", "dit"])
    rows = layers_bench.run_layers(device, dtype, names, batches, quick, 0.02 if quick else 0.2)
    files = list(write_results(out, "layers", env, rows))
    title = f"on {env['device']} ({env['commit']})"
    speed = plot_speedups([r for r in rows if r["backend"] != "dense" and "median_ms" in r],
                          out / "layers_speedup.png", "speedup_vs_dense", "shape",
                          f"2:4 layers vs dense, speedup by layer {title}")  # fmt: skip
    # Latency by batch size: each backend's time summed over the unique layers, weighted by how
    # many layers of the models share each shape (a model's linear+conv time).
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        if "median_ms" in r:
            per_batch = series.setdefault(r["backend"], {})
            per_batch[r["batch"]] = per_batch.get(r["batch"], 0.0) + r["median_ms"] * r["count"]
    lines = plot_lines({b: list(s.items()) for b, s in series.items()}, out / "layers_latency_by_batch.png",
                       "batch size", "sum of layer latencies (ms, x layer count)",
                       f"{', '.join(names)} linear+conv layers {title}")  # fmt: skip
    return files + [p for p in (speed, lines) if p]


def _models_suite(out: Path, device: torch.device, quick: bool, env: dict, models: list[str] | None) -> list[Path]:
    rows = models_bench.run_models(device, quick, models)
    files = list(write_results(out, "models", env, rows))
    title = f"on {env['device']} ({env['commit']})"
    loops = [r for r in rows if r["mode"] != "step"]
    latency = plot_bars({f"{r['model']} {r['variant']} ({r['kind']})": r["median_ms"] for r in loops},
                        out / "models_latency.png", f"{loops[0]['mode'] if loops else 'ddim'} latency (ms)",
                        f"whole-model sampling latency {title}")  # fmt: skip
    memory = plot_bars({f"{r['model']} {r['variant']}": r["peak_total_mib"] for r in loops},
                       out / "models_memory.png", "peak memory (MiB)",
                       f"peak memory, {loops[0]['memory_method'] if loops else ''} {title}")  # fmt: skip
    return files + [p for p in (latency, memory) if p]


def main(argv: list[str] | None = None) -> int:
    """Run the chosen suites and write their JSON, CSV and PNGs into --out; 0 on success."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads / --quick must not leak into a caller's process


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out", help="directory for every result file")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few shapes and batches, small models")
    parser.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    parser.add_argument("--layer-models", default=None, help="layers suite: subset of ddpm, sd15, dit")
    parser.add_argument("--models", default=None, help=f"models suite: subset of {', '.join(models_bench.MODELS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's; 1 with --quick on CPU)")  # fmt: skip
    args = parser.parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown or not suites:
        parser.error(f"--suite takes a comma-separated subset of {', '.join(SUITES)}, got {args.suite!r}")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    start, files, seconds = time.perf_counter(), [], {}
    for suite in suites:
        t0 = time.perf_counter()
        if suite == "ops":
            ops_argv = ["--out", str(out), "--device", device.type] + (["--quick"] if args.quick else [])
            if ops_bench.main(ops_argv) != 0:
                return 1
            files += [out / f"ops.{ext}" for ext in ("json", "csv", "png")]
        elif suite == "layers":
            layer_models = args.layer_models.split(",") if args.layer_models else None
            files += _layers_suite(out, device, args.quick, env, layer_models)
        else:
            files += _models_suite(out, device, args.quick, env, args.models.split(",") if args.models else None)
        seconds[suite] = round(time.perf_counter() - t0, 2)
    summary = {"environment": env, "quick": args.quick, "suites": suites, "seconds": seconds,
               "files": sorted(str(p.relative_to(out)) for p in files if p.exists())}  # fmt: skip
    write_text_atomic(out / "bench.json", json.dumps(summary, indent=1) + "\n")
    print(f"bench: {', '.join(suites)} on {env['device']} in {time.perf_counter() - start:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
