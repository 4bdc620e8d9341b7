"""Benchmark of the Gumbel N:M sampling ops against an eager PyTorch implementation, in one run.

Eager baseline: what one writes in PyTorch without a kernel: torch.rand -> -log(-log(u)), topk and
scatter for hard masks, the successive-softmax relaxation op by op, F.gumbel_softmax @ patterns, and
autograd for the backward. Ours: the compiled extension (CPU; CUDA on a GPU) and, on a GPU, Triton.
Every timed op is first checked for exact N:M output. GPU rows add the fraction of peak DRAM bandwidth.

    python -m bench.gumbel --out bench/out [--device cpu|cuda] [--quick]"""

from __future__ import annotations

import torch

from prunedm import ops
from prunedm.measure import time_ms
from prunedm.ops import reference

from .common import (
    WEIGHT_SHAPES,
    bench_parser,
    environment,
    op_backends,
    op_row,
    peak_bandwidth_gbps,
    resolve_device,
    write_results,
)

SHAPES = {name: WEIGHT_SHAPES[name] for name in ("dit-xl2.qkv", "dit-xl2.mlp_in", "sd15.attn_640", "sd15.conv3x3_320")}
QUICK_SHAPES = ["sd15.attn_640", "sd15.conv3x3_320"]


def eager_gumbel(logits: torch.Tensor) -> torch.Tensor:
    u = torch.rand(logits.shape, device=logits.device).clamp_(min=torch.finfo(torch.float32).tiny)
    return logits.float() - torch.log(-torch.log(u))


def eager_nm_sample(logits: torch.Tensor, n: int, m: int, tau: float, hard: bool) -> torch.Tensor:
    keys = eager_gumbel(logits).reshape(-1, m)
    if hard:
        # Straight-through as usual in eager code: the relaxation is computed for the gradient.
        soft = reference.relaxed_top_n_ref(keys, n, tau) if logits.requires_grad else None
        kept = torch.zeros_like(keys).scatter_(-1, keys.detach().topk(n, -1).indices, 1.0)
        out = kept if soft is None else kept + (soft - soft.detach())
    else:
        out = reference.relaxed_top_n_ref(keys, n, tau)
    return out.reshape(logits.shape).to(logits.dtype)


def eager_pattern_sample(logits: torch.Tensor, n: int, m: int, tau: float, hard: bool) -> torch.Tensor:
    patterns = ops.nm_patterns(n, m, dtype=torch.float32, device=logits.device)
    y = torch.nn.functional.gumbel_softmax(logits.float(), tau=tau, hard=hard)
    return (y @ patterns).reshape(*logits.shape[:-2], logits.shape[-2] * m).to(logits.dtype)


def _check_nm(mask: torch.Tensor, n: int, m: int, label: str) -> None:
    sums = mask.float().reshape(-1, m).sum(-1)
    assert bool((sums == n).all()), f"{label}: not exactly {n}:{m}"


def bench_shape(label: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> list[dict]:
    n, m, tau = 2, 4, 0.5
    rows_out, cols = shape
    nm_logits = torch.randn(shape, dtype=dtype, device=device)
    pattern_logits = torch.randn(rows_out, cols // m, 6, dtype=dtype, device=device)
    bandwidth = peak_bandwidth_gbps(device)
    size = nm_logits.element_size()
    rows = []

    def row(op: str, backend: str, fn, moved_bytes: float, baseline: dict | None) -> dict:
        timing = time_ms(fn, device)
        r = op_row(op, f"{label} {rows_out}x{cols}", dtype, backend, timing, baseline, moved_bytes, device, bandwidth)
        rows.append(r)
        return r

    def backward_fn(sample, logits, **kwargs):
        x = logits.detach().requires_grad_()

        def run():
            out = sample(x, **kwargs)
            out.backward(torch.ones_like(out))

        return run

    cases = [
        # (op name, eager fn, our op, logits, bytes moved: forward reads logits and writes the mask)
        ("gumbel_nm_sample hard", lambda x: eager_nm_sample(x, n, m, tau, True),
         lambda x, b: ops.gumbel_nm_sample(x, n, m, tau, True, seed=1, backend=b), nm_logits,
         2 * nm_logits.numel() * size),
        ("gumbel_nm_sample soft", lambda x: eager_nm_sample(x, n, m, tau, False),
         lambda x, b: ops.gumbel_nm_sample(x, n, m, tau, False, seed=1, backend=b), nm_logits,
         2 * nm_logits.numel() * size),
        ("gumbel_pattern_sample hard", lambda x: eager_pattern_sample(x, n, m, tau, True),
         lambda x, b: ops.gumbel_pattern_sample(x, n, m, tau, True, seed=1, backend=b), pattern_logits,
         (pattern_logits.numel() + nm_logits.numel()) * size),
    ]  # fmt: skip
    for op, eager, ours, logits, moved in cases:
        base = row(op, "eager", lambda e=eager, x=logits: e(x), moved, None)
        for backend in op_backends(device):
            out = ours(logits, backend)
            if "hard" in op:
                _check_nm(out, n, m, f"{op} {backend}")
            row(op, backend, lambda o=ours, x=logits, b=backend: o(x, b), moved, base)
        # Forward + backward (straight-through): the gradient reads logits and grad, writes grad.
        base = row(f"{op} fwd+bwd", "eager", backward_fn(lambda x: eager(x), logits), 2.5 * moved, None)
        for backend in op_backends(device):
            fn = backward_fn(lambda x, o=ours, b=backend: o(x, b), logits)
            row(f"{op} fwd+bwd", backend, fn, 2.5 * moved, base)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = bench_parser(__doc__, "gumbel", quick="two small shapes, float32 only").parse_args(argv)
    device = resolve_device(args.device)
    names = QUICK_SHAPES if args.quick else list(SHAPES)
    dtypes = [torch.float32] if args.quick or device.type == "cpu" else [torch.float32, torch.bfloat16]
    rows = []
    for name in names:
        for dtype in dtypes:
            shape_rows = bench_shape(name, SHAPES[name], dtype, device)
            rows += shape_rows
            for r in shape_rows:
                if r["backend"] != "eager":
                    print(f"{name} {r['dtype']} {r['op']}: {r['backend']} {r['median_ms']:.3f} ms, "
                          f"{r['speedup_vs_baseline']:.1f}x vs eager")  # fmt: skip
    json_path, csv_path = write_results(args.out, "gumbel", environment(device), rows)
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
