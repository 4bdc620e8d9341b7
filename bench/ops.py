"""Benchmark of the 2:4 format ops: nm_mask and compress_2to4 against their baselines, in one run.

CPU: our C++ kernel against the reference (and torch's CUTLASS converter for compression).
GPU: our CUDA and Triton kernels against torch.sparse.to_sparse_semi_structured, and as a
fraction of peak memory bandwidth. Every timed output is first checked against the reference.

    python -m bench.ops --out bench/out [--device cpu|cuda] [--quick]"""

from __future__ import annotations

import torch
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

from prunedm import ops
from prunedm.measure import time_ms

from .common import (
    WEIGHT_SHAPES,
    bench_parser,
    environment,
    op_backends,
    op_row,
    peak_bandwidth_gbps,
    plot_speedups,
    resolve_device,
    write_results,
)

SHAPES = WEIGHT_SHAPES
QUICK_SHAPES = ["dit-xl2.qkv", "sd15.attn_640"]


def bench_shape(label: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> list[dict]:
    weight = torch.randn(shape, dtype=dtype, device=device)
    pruned = weight * ops.nm_mask(weight, backend="reference")
    expected_mask = ops.nm_mask(weight.cpu(), backend="reference")
    expected_values, expected_meta = sparse_semi_structured_from_dense_cutlass(pruned.cpu())
    bandwidth = peak_bandwidth_gbps(device)
    rows = []

    def row(op: str, backend: str, fn, moved_bytes: int, baseline: dict | None) -> dict:
        size = f"{label} {shape[0]}x{shape[1]}"
        r = op_row(op, size, dtype, backend, time_ms(fn, device), baseline, moved_bytes, device, bandwidth)
        rows.append(r)
        return r

    # nm_mask: reads the weight, writes a bool mask.
    mask_bytes = weight.numel() * (weight.element_size() + 1)
    mask_base = row("nm_mask", "reference", lambda: ops.nm_mask(weight, backend="reference"), mask_bytes, None)
    for backend in op_backends(device):
        got = ops.nm_mask(weight, backend=backend)
        assert torch.equal(got.cpu(), expected_mask), f"nm_mask {backend} differs from the reference"
        row("nm_mask", backend, lambda b=backend: ops.nm_mask(weight, backend=b), mask_bytes, mask_base)

    # compress_2to4: reads the dense matrix, writes values (half) and metadata (1/16 x int16).
    compress_bytes = pruned.numel() * pruned.element_size() * (1 + 9 / 16)
    if device.type == "cuda":
        from torch.sparse import to_sparse_semi_structured

        baseline = row("compress_2to4", "torch.to_sparse_semi_structured",
                       lambda: to_sparse_semi_structured(pruned), compress_bytes, None)  # fmt: skip
    else:
        baseline = row("compress_2to4", "torch_cutlass_converter",
                       lambda: sparse_semi_structured_from_dense_cutlass(pruned), compress_bytes, None)  # fmt: skip
        row("compress_2to4", "reference", lambda: ops.compress_2to4(pruned, backend="reference"),
            compress_bytes, baseline)  # fmt: skip
    for backend in op_backends(device):
        values, meta = ops.compress_2to4(pruned, backend=backend)
        assert torch.equal(values.cpu(), expected_values) and torch.equal(meta.cpu(), expected_meta), backend
        row("compress_2to4", backend, lambda b=backend: ops.compress_2to4(pruned, backend=b), compress_bytes, baseline)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = bench_parser(__doc__, "ops", quick="two shapes, fp16 only").parse_args(argv)
    device = resolve_device(args.device)
    names = QUICK_SHAPES if args.quick else list(SHAPES)
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    rows = []
    for name in names:
        for dtype in dtypes:
            rows += bench_shape(name, SHAPES[name], dtype, device)
            last = [r for r in rows if r["shape"].startswith(name)][-1]
            print(
                f"{name} {dtype}: compress {last['backend']} {last['speedup_vs_baseline']:.2f}x vs {last['baseline']}"
            )
    env = environment(device)
    json_path, csv_path = write_results(args.out, "ops", env, rows)
    for r in rows:
        r["label"] = f"{r['op']} {r['shape']} {r['dtype']}"
    png = plot_speedups(rows, json_path.with_suffix(".png"), "speedup_vs_baseline", "label",
                        f"2:4 ops vs baseline on {env['device']} ({env['commit']})")  # fmt: skip
    print(f"wrote {json_path}, {csv_path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
