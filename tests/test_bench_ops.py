"""The op benchmark runs on CPU and writes rows that carry their baseline ratio and environment."""

from __future__ import annotations

import json

from prunedm.bench import ops as bench_ops


def test_quick_ops_bench_writes_json_csv_png(tmp_path):
    assert bench_ops.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ops.json").read_text())
    env = result["environment"]
    assert env["device"].startswith("cpu") and env["commit"] and env["torch"]
    rows = result["rows"]
    assert {r["op"] for r in rows} == {"nm_mask", "compress_2to4"}
    assert all(r["median_ms"] > 0 and r["speedup_vs_baseline"] > 0 for r in rows)
    assert any(r["backend"] == "extension" for r in rows)
    assert (tmp_path / "ops.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "ops.png").stat().st_size > 0
