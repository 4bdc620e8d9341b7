"""Per-call Python overhead of SparseLinear / SparseConv2d against nn.Linear / nn.Conv2d, on tiny CPU shapes.

Shapes are small enough that the arithmetic is negligible and what is timed is the layer's own work per
call: Linear 64->64 at batch 8, Conv2d 16->16 (and 32->32, which prunedm's conv takes) 3x3 on 8x8 at batch
2, float32, one thread, no autograd, all in one run. Each sparse layer is timed on every path reachable on
CPU: `cache_dense` (cache_dense=True: the masked dense weight kept), `decompress` (the default: the weight
decompressed per call), `prunedm` (prunedm's own kernel, its CPU twin) and `prunedm-stub` (the same path
with the kernel replaced, in prunedm.ops' backend table, by one returning a preallocated output: the Python
the path adds around the kernel). Target (issue 14): cache_dense at most 1.15x dense.

    python -m bench.overhead [--out FILE] [--min-run-time SECONDS]"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path

import torch
import torch.nn as nn

from prunedm._atomic import write_text_atomic
from prunedm.measure import time_ms
from prunedm.nn import SparseConv2d, SparseLinear
from prunedm.ops import _backends

from .common import environment

TARGET_CACHE_DENSE_RATIO = 1.15
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "cpu"
VARIANTS = ("dense", "cache_dense", "decompress", "prunedm", "prunedm-stub")


def _shapes() -> list[tuple[str, nn.Module, torch.Tensor, type]]:
    torch.manual_seed(0)
    return [
        ("linear 64->64, batch 8", nn.Linear(64, 64), torch.randn(8, 64), SparseLinear),
        ("conv2d 16->16 3x3, 8x8, batch 2", nn.Conv2d(16, 16, 3, padding=1), torch.randn(2, 16, 8, 8), SparseConv2d),
        # prunedm's conv needs 9 * Cin in multiples of 32, which 16 channels are not: this row has the prunedm path.
        ("conv2d 32->32 3x3, 8x8, batch 2", nn.Conv2d(32, 32, 3, padding=1), torch.randn(2, 32, 8, 8), SparseConv2d),
    ]


@contextlib.contextmanager
def _stubbed_kernel(op: str, output: torch.Tensor):
    """op's implementations in prunedm.ops' backend table (the extension's, and the reference the prunedm path
    runs without it) return `output` at once while inside; everything the layer does around them still runs."""
    stub = lambda *args, **kwargs: output  # noqa: E731
    with _backends.replaced(op, "extension", stub), _backends.replaced(op, "reference", stub):
        yield


def _sparse_layer(variant: str, dense: nn.Module, cls: type) -> nn.Module:
    backend = "prunedm" if variant.startswith("prunedm") else "auto"
    return cls.from_dense(dense, backend=backend, cache_dense=variant == "cache_dense").eval()


def measure(min_run_time: float = 0.5) -> list[dict]:
    """One row per (shape, variant): median, 20/80% quantiles in microseconds, ratio to dense, the path taken."""
    rows = []
    for shape, dense, x, cls in _shapes():
        dense = dense.eval()
        with torch.no_grad():
            # Sparse rows are checked against the dense layer holding the same 2:4-masked weight.
            expected = {"dense": dense(x), "masked": cls.from_dense(dense).to_dense().eval()(x)}
        dense_us = None
        for variant in VARIANTS:
            layer = dense if variant == "dense" else _sparse_layer(variant, dense, cls)
            op = "sparse_linear_2to4" if cls is SparseLinear else "sparse_conv2d_2to4"
            stub = _stubbed_kernel(op, torch.empty_like(expected["dense"])) if variant == "prunedm-stub" else None

            def call(layer=layer):
                with torch.no_grad():
                    return layer(x)

            with stub or contextlib.nullcontext():
                out = call()
                path = "dense" if variant == "dense" else layer.last_run[0]
                times = time_ms(call, torch.device("cpu"), min_run_time=min_run_time)
            row = {"shape": shape, "variant": variant, "path": path}
            if variant != "dense" and path == "dense" and variant.startswith("prunedm"):
                row["note"] = f"prunedm path not reachable here: {layer.last_run[1]}"
            if variant != "prunedm-stub":  # the stub's output is garbage by design
                reference_out = expected["dense" if variant == "dense" else "masked"]
                row["max_abs_err"] = float((out - reference_out).abs().max())
            row.update({key.replace("_ms", "_us"): value * 1e3 for key, value in times.items()})
            dense_us = row["median_us"] if variant == "dense" else dense_us
            row["ratio_to_dense"] = row["median_us"] / dense_us
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':32} {'variant':13} {'path':8} {'median us':>10} {'x dense':>8}"]
    for row in rows:
        lines.append(
            f"{row['shape']:32} {row['variant']:13} {row['path']:8} {row['median_us']:10.2f} "
            f"{row['ratio_to_dense']:8.2f}" + (f"  ({row['note']})" if "note" in row else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/cpu/overhead-<date>.json)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per row")
    args = parser.parse_args(argv)
    if not args.min_run_time > 0:
        parser.error(f"--min-run-time must be > 0 seconds, got {args.min_run_time}")
    # Per-call overhead is a single-thread quantity; more threads only add noise on shared machines.
    torch.set_num_threads(1)
    rows = measure(args.min_run_time)
    worst = max(row["ratio_to_dense"] for row in rows if row["variant"] == "cache_dense")
    result = {
        "environment": environment(torch.device("cpu")),
        "target": {"cache_dense_max_ratio": TARGET_CACHE_DENSE_RATIO, "worst": worst,
                   "met": worst <= TARGET_CACHE_DENSE_RATIO},
        "rows": rows,
    }  # fmt: skip
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else RESULTS_DIR / f"overhead-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(table(rows))
    verdict = "met" if result["target"]["met"] else "NOT met"
    print(f"cache_dense worst {worst:.2f}x dense (target <= {TARGET_CACHE_DENSE_RATIO}x: {verdict}); wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
