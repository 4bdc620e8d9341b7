"""bench/gumbel.py: rows of one tiny shape on CPU, each through bench.common.op_row (the op benchmarks' one row)."""

from __future__ import annotations

import torch

from prunedm.bench import gumbel
from prunedm.bench.common import op_row


def test_op_row_speedup_and_baseline():
    cpu = torch.device("cpu")
    base = op_row("op", "tiny 8x16", torch.float32, "eager", {"median_ms": 2.0}, None, 64, cpu, None)
    assert base == {"op": "op", "shape": "tiny 8x16", "dtype": "float32", "backend": "eager", "median_ms": 2.0,
                    "speedup_vs_baseline": 1.0, "baseline": "eager"}  # fmt: skip
    fast = op_row("op", "tiny 8x16", torch.bfloat16, "extension", {"median_ms": 0.5}, base, 64, cpu, None)
    assert (fast["speedup_vs_baseline"], fast["baseline"], fast["dtype"]) == (4.0, "eager", "bfloat16")
    assert "achieved_gbps" not in fast  # bandwidth only on CUDA


def test_bench_shape_rows_on_cpu(monkeypatch):
    monkeypatch.setattr(gumbel, "time_ms", lambda fn, device: (fn(), {"median_ms": 1.0, "q20_ms": 1.0})[1])
    rows = gumbel.bench_shape("tiny", (8, 16), torch.float32, torch.device("cpu"))
    ops = {"gumbel_nm_sample hard", "gumbel_pattern_sample hard"}
    assert ops | {f"{op} fwd+bwd" for op in ops} <= {r["op"] for r in rows}
    assert all(r["shape"] == "tiny 8x16" and r["dtype"] == "float32" for r in rows)
    assert all(r["baseline"] == "eager" and r["speedup_vs_baseline"] == 1.0 for r in rows)
