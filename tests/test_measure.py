"""prunedm.measure: the one latency timer and the one per-layer MAC count (the CLI's demo and bench/ use them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(8, 6)

    def forward(self, sample: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.grouped(self.conv(sample))  # [B, 8, 4, 4]
        h = self.head(h.flatten(2).transpose(1, 2))  # [B, 16, 6]
        return self.head(torch.ones(h.shape[0], 1, 8)) * scale + h.sum()  # head called twice


def test_layer_macs_counts_one_sample_per_layer_and_call():
    from prunedm.measure import layer_macs

    model = Net()
    macs = layer_macs(model, {"sample": torch.randn(3, 4, 8, 8), "scale": 2.0})
    assert macs == {
        "conv": 8 * 8 * 8 * (4 * 3 * 3),  # outputs x Cin*kh*kw
        "grouped": 8 * 4 * 4 * (4 * 3 * 3),  # Cin / groups
        "head": 16 * 6 * 8 + 1 * 6 * 8,  # both calls
    }
    assert layer_macs(model, {"sample": torch.randn(1, 4, 8, 8)}, names={"head"}) == {"head": 16 * 6 * 8 + 6 * 8}
    assert not any(module._forward_hooks for module in model.modules())  # the hooks are gone


def test_time_ms_repeats_calls_exactly_that_many_times_after_one_warm_up():
    from prunedm.measure import time_ms

    calls = []
    timing = time_ms(lambda: calls.append(1), torch.device("cpu"), repeats=5)
    assert len(calls) == 6
    assert 0 <= timing["q20_ms"] <= timing["median_ms"] <= timing["q80_ms"]
    time_ms(lambda: calls.append(1), torch.device("cpu"), repeats=2, warmup=False)
    assert len(calls) == 8
    timing = time_ms(lambda: torch.ones(8).sum(), torch.device("cpu"), min_run_time=0.01)
    assert 0 < timing["q20_ms"] <= timing["q80_ms"] and timing["median_ms"] > 0


@pytest.mark.parametrize("repeats", [0, -1, 2.5, True])
def test_time_ms_refuses_a_bad_repeat_count(repeats):
    from prunedm.measure import time_ms

    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        time_ms(lambda: None, torch.device("cpu"), repeats=repeats)
