"""bench.memory's rows on a tiny model (one process): MaskLLM's mask state is 4 fp32 tensors of 1.5 logits per
target weight (logits, gradient, Adam's two moments), the official formulation's step holds at least ours, and the
a + b / ranks fit projects the sharded part down."""

from __future__ import annotations

import pytest

from prunedm.bench import memory


def test_single_and_official_rows():
    single = memory.measure("single", width=32, blocks=1)
    official = memory.measure("official", width=32, blocks=1)
    assert single["model_bytes_per_param"] == 4.0
    # 1.5 logits per weight of the Linear layers (biases have none), 4 bytes, 4 tensors.
    assert single["mask_state_bytes_per_param"] == pytest.approx(single["logits_per_param"] * 16)
    assert 1.4 < single["logits_per_param"] < 1.5
    assert single["step_transient_bytes_per_param"] > 0
    assert single["peak_bytes_per_param"] <= official["peak_bytes_per_param"] * 1.05


def test_projection_fits_a_plus_b_over_ranks():
    rows = [{"path": "single", "ranks": 1, "mask_state_bytes_per_param": 24.0}]
    rows += [{"path": "fsdp", "ranks": r, "mask_state_bytes_per_param": 0.5 + 23.5 / r} for r in (1, 2, 4)]
    a, b = memory.fit_per_rank(rows[1:], "mask_state_bytes_per_param")
    assert (a, b) == (pytest.approx(0.5), pytest.approx(23.5))
    sdxl = memory.projection(rows)[0]
    assert sdxl["fsdp_mask_state_bytes_per_param_per_rank"] == pytest.approx(0.5 + 23.5 / 8)
    assert sdxl["ddp_mask_state_gb_per_rank"] == pytest.approx(24.0 * 2.6)


def test_maskpro_single_row():
    row = memory.measure("single", width=32, blocks=1, method="maskpro")
    # One fp32 logit per weight of the Linear layers, its gradient, and the bool initial mask; SGD keeps no state.
    assert row["method"] == "maskpro"
    assert row["mask_state_bytes_per_param"] == pytest.approx(row["logits_per_param"] * 9)
    assert 0.95 < row["logits_per_param"] < 1.0
