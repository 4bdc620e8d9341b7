"""A sparse layer fixes its forward per input signature at the first call (a layer that runs dense for every input,
once for all): later calls skip the path choice, and still follow every change of its weights, device, dtype or
copies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunedm
from prunedm.nn import SparseConv2d, SparseLinear

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _no_choice(*_):
    raise AssertionError("the path was chosen again")


def _layers():
    torch.manual_seed(0)
    linear = SparseLinear.from_dense(nn.Linear(16, 8), cache_dense=True)
    conv = SparseConv2d.from_dense(nn.Conv2d(8, 4, 3, padding="same"), cache_dense=True)
    reflect = SparseConv2d.from_dense(nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"))
    return [(linear, torch.randn(3, 16)), (conv, torch.randn(2, 8, 5, 5)), (reflect, torch.randn(8, 5, 5))]


def _expected(layer, x):
    return layer.to_dense()(x)


@pytest.mark.parametrize("index", range(3))
def test_later_calls_skip_the_path_choice_and_match_the_masked_dense_layer(index):
    layer, x = _layers()[index]
    with torch.no_grad():
        first = layer(x)
        layer._runtime.choose_path = _no_choice
        assert torch.equal(layer(x), first)
        assert torch.equal(layer(x), _expected(layer, x))
    assert layer.last_run[0] == "dense"


def test_fixed_forward_follows_reloads_moves_copies_and_bias_changes():
    (linear, x), _, _ = _layers()
    with torch.no_grad():
        linear(x)
        torch.manual_seed(1)
        other = SparseLinear.from_dense(nn.Linear(16, 8))
        linear.load_state_dict(other.state_dict())
        assert torch.equal(linear(x), F.linear(x, other.dense_matrix(), other.bias))

        copied = copy.deepcopy(linear)
        copied(x)
        copied.bias.add_(1.0)
        assert torch.equal(linear(x), F.linear(x, other.dense_matrix(), other.bias))
        assert torch.equal(copied(x), F.linear(x, other.dense_matrix(), other.bias + 1.0))

        linear.bias = torch.full((8,), 2.0)  # a reassigned buffer, not only an in-place change
        assert torch.equal(linear(x), F.linear(x, other.dense_matrix(), torch.full((8,), 2.0)))

        linear.double()
        out = linear(x.double())
        assert out.dtype == torch.float64
        assert torch.equal(out, F.linear(x.double(), other.dense_matrix().double(), torch.full((8,), 2.0).double()))


def test_sparsify_report_still_records_the_users_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    report = prunedm.sparsify(model, verify=True)
    assert report.runtime() == {"0": None, "2": None}  # verify's own forward is not reported
    with torch.no_grad():
        model(torch.randn(2, 32))
    assert [run[0] for run in report.runtime().values()] == ["dense", "dense"]


def _refuse(*_args, **_kwargs):
    raise AssertionError("policy work in a call whose signature was seen before")


@pytest.mark.parametrize("make", ["linear", "conv"])
def test_prunedm_path_does_no_policy_work_after_a_signatures_first_call(make, monkeypatch):
    from prunedm import _ext, ops
    from prunedm.ops import _backends as op_table

    torch.manual_seed(0)
    if make == "linear":
        layer, x = SparseLinear.from_dense(nn.Linear(64, 32), backend="prunedm"), torch.randn(3, 64)
    else:
        layer, x = SparseConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1), backend="prunedm"), torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        first = layer(x)
        assert layer.last_run[0] == "prunedm"
        for target, name in [(_ext, "extension_info"), (ops, "sparse_kernel_backend"), (op_table, "resolve"),
                             (ops, "sparse_linear_2to4"), (ops, "sparse_conv2d_2to4")]:  # fmt: skip
            monkeypatch.setattr(target, name, _refuse)
        layer._runtime.choose_path = _refuse
        assert torch.equal(layer(x), first) and layer.last_run[0] == "prunedm"
        torch.testing.assert_close(first, _expected(layer, x), rtol=1e-4, atol=1e-4)
        monkeypatch.undo()
        del layer._runtime.choose_path
        layer(x[:1])  # a new signature chooses once
        assert len(layer._runtime.calls) == 2
