"""bench/models.py: whole-model rows (step and DDIM loop) for dense, pruned, 2:4 and both, on CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from prunedm.bench import models  # noqa: E402


@pytest.fixture
def one_thread():
    """Like bench.run --quick on CPU: one thread, so a loaded shared machine does not stall OpenMP."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_unet_rows(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path))
    rows = models.bench_model("tiny-unet", torch.device("cpu"), torch.float32, batch=1, steps=2, rounds=1,
                              min_run_time=0.01)  # fmt: skip
    assert [(r["variant"], r["mode"]) for r in rows] == [(v, m) for v in models.VARIANTS for m in ("step", "ddim-2")]
    by = {(r["variant"], r["mode"]): r for r in rows}
    dense, pruned, sparse = by["dense", "step"], by["pruned", "step"], by["2:4", "step"]
    assert dense["speedup_vs_dense"] == 1.0 and all(r["median_ms"] > 0 and r["samples_per_s"] > 0 for r in rows)
    assert pruned["params"] < dense["params"] and pruned["macs_per_sample"] < dense["macs_per_sample"]
    assert sparse["params"] == dense["params"] and sparse["nonzero_params"] < dense["params"]
    assert sparse["effective_macs_per_sample"] < sparse["macs_per_sample"] == dense["macs_per_sample"]
    assert sparse["kind"] == "cpu-reference" and dense["kind"] == "dense" and sparse["dense_fallback_layers"] > 0
    assert all(r["memory_method"].startswith("cpu") and r["peak_total_mib"] > 0 for r in rows)
    with pytest.raises(ValueError, match="variants"):
        models.bench_model("tiny-unet", torch.device("cpu"), torch.float32, 1, 1, 1, 0.01, variants=("bogus",))
