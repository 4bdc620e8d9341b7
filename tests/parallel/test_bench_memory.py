"""bench.memory's rows on a tiny model (one process): MaskLLM's mask state is 4 fp32 tensors of 1.5 logits per
target weight (logits, gradient, Adam's two moments), the official formulation's step and ours before its transient
savings (composed) hold more than ours, bf16 halves the model's bytes, and the a + b / ranks fit projects the sharded
part down."""

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
    # Without logits * scale kept per layer (1.5 floats per weight) nor W * M (1 float) the forward's peak drops by
    # 10 B/param; on this one-block model the step's peak moves to Adam's update of the largest layer (at width 256,
    # 4 blocks: 10.2 -> 2.1).
    composed = memory.measure("composed", width=32, blocks=1)
    assert single["step_transient_bytes_per_param"] < composed["step_transient_bytes_per_param"] - 3
    assert single["top"] and all(size > 0 for size in single["top"].values())


def test_bf16_row():
    row = memory.measure("single", width=32, blocks=1, precision="bf16")
    assert (row["precision"], row["model_bytes_per_param"]) == ("bf16", 2.0)
    assert row["mask_state_bytes_per_param"] == pytest.approx(row["logits_per_param"] * 16)  # fp32 as before


def test_projection_fits_a_plus_b_over_ranks():
    rows = [{"path": "single", "ranks": 1, "mask_state_bytes_per_param": 24.0, "peak_bytes_per_param": 30.0}]
    rows += [{"path": "fsdp", "ranks": r, "mask_state_bytes_per_param": 0.5 + 23.5 / r,
              "peak_bytes_per_param": 2 + 28 / r} for r in (1, 2, 4)]  # fmt: skip
    a, b = memory.fit_per_rank(rows[1:], "mask_state_bytes_per_param")
    assert (a, b) == (pytest.approx(0.5), pytest.approx(23.5))
    sdxl = memory.projection(rows)[0]
    assert sdxl["fsdp_mask_state_bytes_per_param_per_rank"] == pytest.approx(0.5 + 23.5 / 8)
    assert sdxl["ddp_mask_state_gb_per_rank"] == pytest.approx(24.0 * 2.6)
    assert sdxl["fsdp_peak_gb_per_rank"] == pytest.approx((2 + 28 / 8) * 2.6)


def test_maskpro_single_row():
    row = memory.measure("single", width=32, blocks=1, method="maskpro")
    # One fp32 logit per weight of the Linear layers, its gradient, and the bool initial mask; SGD keeps no state.
    assert row["method"] == "maskpro"
    assert row["mask_state_bytes_per_param"] == pytest.approx(row["logits_per_param"] * 9)
    assert 0.95 < row["logits_per_param"] < 1.0
