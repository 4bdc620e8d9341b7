"""torch.library.opcheck on every compiled op: schema, fake (meta) implementation, autograd
registration and torch.compile tracing; and a torch.compile run without graph breaks."""

from __future__ import annotations

import pytest
import torch
from conftest import random_2to4

import prunedm

pytestmark = pytest.mark.skipif(not prunedm.extension_info()["cpu"]["usable"], reason="extension not built")


def _cases():
    w = torch.randn(6, 16)
    dense = random_2to4(64, 64, torch.float16)
    values, meta = torch.ops.prunedm.compress_2to4(dense)
    return [
        (torch.ops.prunedm.nm_mask.default, (w, 2, 4)),
        (torch.ops.prunedm.nm_mask.default, (w.double(), 1, 8)),
        (torch.ops.prunedm.nm_violations.default, (w, 2, 4)),
        (torch.ops.prunedm.compress_2to4.default, (dense,)),
        (torch.ops.prunedm.compress_2to4.default, (dense.bfloat16(),)),
        (torch.ops.prunedm.decompress_2to4.default, (values, meta)),
        (torch.ops.prunedm.conv_weight_to_matrix.default, (torch.randn(4, 8, 3, 3, requires_grad=True),)),
        (torch.ops.prunedm.matrix_to_conv_weight.default, (torch.randn(4, 72, requires_grad=True), [4, 8, 3, 3])),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = _cases()[index]
    torch.library.opcheck(op, args)


def test_torch_compile_traces_compress_without_graph_breaks():
    def prune_and_pack(w):
        mask = torch.ops.prunedm.nm_mask(w, 2, 4)
        return torch.ops.prunedm.compress_2to4(w * mask)

    w = torch.randn(64, 128, dtype=torch.float16)
    compiled = torch.compile(prune_and_pack, fullgraph=True, backend="eager")
    values, meta = compiled(w)
    expected_values, expected_meta = prune_and_pack(w)
    assert torch.equal(values, expected_values) and torch.equal(meta, expected_meta)
