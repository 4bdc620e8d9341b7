"""bench.pruning: pruned and dense variants timed side by side, eager and through torch.compile."""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DModel

from prunedm.bench import pruning as bench_pruning
from prunedm.pruning import prune_channels


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()  # fmt: skip


def inputs(batch: int = 2) -> dict:
    return {"sample": torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
            "timestep": torch.tensor([10, 500][:batch])}  # fmt: skip


def test_rows_time_dense_and_pruned_side_by_side():
    dense = tiny_unet()
    pruned = copy.deepcopy(dense)
    count_inputs = {k: v[:1] for k, v in inputs().items()}
    prune_channels(pruned, "magnitude", 0.5, example_inputs=count_inputs)
    variants = [("dense", dense), ("channels-0.5", pruned)]
    rows = bench_pruning._rows("tiny", variants, inputs(), count_inputs, 2, torch.device("cpu"), 0.02, 2)
    assert [r["variant"] for r in rows] == ["dense", "channels-0.5"]
    assert rows[0]["speedup_vs_dense"] == 1.0 and rows[0]["macs_ratio"] == 1.0
    assert rows[1]["params"] < rows[0]["params"] and 0 < rows[1]["macs_ratio"] < 0.5
    assert all(r["execution"] == "eager" and r["median_ms"] > 0 and r["rounds"] == 2 for r in rows)


def test_compiled_forward_matches_eager_and_leaves_inductor_settings_alone():
    import torch._inductor.config as inductor_config

    model = tiny_unet()
    with torch.inference_mode():
        expected = model(**inputs()).sample
    forward = bench_pruning._forward(model, inputs(), torch.device("cpu"), compiled=True)
    torch.testing.assert_close(forward(), expected, rtol=1e-4, atol=1e-4)
    assert inductor_config.freezing is False
