"""cuSPARSELt 2:4 matmul with a searched algorithm: alg_id / split_k found once per shape, then reused.

torch (2.14) rebuilds cuSPARSELt's descriptors and plan on every _cslt_sparse_mm call
(aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp: cusparseLtMatmulPlanInit ... MatDescriptorDestroy
per call; the plan-cache PR #137218 was closed in favour of callers caching alg_id, and libtorch_cuda
has no cuSPARSELt plan cache), so what can be cached is the search result, which prunedm keeps in
the autotune cache beside the auto decision. Every private torch API is guarded with hasattr."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# cuSPARSELt's dense operand needs rows in multiples of 8 for float16/bfloat16 (torch pads the same way).
DENSE_MIN_ROWS = 8
DEFAULT_PARAMS = (0, 1, -1)  # alg_id, split_k, split_k_mode: cuSPARSELt's defaults


def mm_available() -> bool:
    """Whether this torch exposes torch._cslt_sparse_mm (with alg_id/split_k arguments)."""
    return hasattr(torch, "_cslt_sparse_mm") and bool(getattr(torch._C, "_has_cusparselt", False))


def _search_fn():
    module = getattr(torch._C, "_cusparselt", None)
    return getattr(module, "mm_search", None)


def _pad_rows(x2d: torch.Tensor) -> torch.Tensor:
    pad = (-x2d.shape[0]) % DENSE_MIN_ROWS
    return F.pad(x2d, (0, 0, 0, pad)) if pad else x2d


def search(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int] | None:
    """(alg_id, split_k, split_k_mode) that cuSPARSELt's search finds fastest for `x2d` @ W.T, or None.

    Uses torch._C._cusparselt.mm_search (torch >= 2.6: returns alg_id, split_k, split_k_mode,
    max_alg_id), else torch._cslt_sparse_mm_search (alg_id only); None when neither exists or the search fails."""
    dense_b = _pad_rows(x2d).t()
    search_fn = _search_fn()
    try:
        if search_fn is not None:
            alg_id, split_k, split_k_mode, _ = search_fn(packed, dense_b, bias, None, None, True)
            return int(alg_id), int(split_k), int(split_k_mode)
        if hasattr(torch, "_cslt_sparse_mm_search"):
            return int(torch._cslt_sparse_mm_search(packed, dense_b, bias=bias, transpose_result=True)), 1, -1
    except (RuntimeError, TypeError, ValueError):
        return None
    return None


def _linear_impl(
    packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None, rows: int, alg_id: int, split_k: int, mode: int
) -> torch.Tensor:
    m = x2d.shape[0]
    dense_b = _pad_rows(x2d).t()
    # transpose_result=True gives [M_padded, rows] row-major: the linear's output layout, no copy.
    out = torch._cslt_sparse_mm(
        packed, dense_b, bias=bias, transpose_result=True, alg_id=alg_id, split_k=split_k, split_k_mode=mode
    )
    return out[:m].contiguous() if out.shape[0] != m else out


_linear_op = None


def _registered_op():
    """A custom op around _cslt_sparse_mm with a correct fake (torch's meta for a 1-D packed tensor is not),
    so that torch.compile traces it without a graph break."""
    global _linear_op
    if _linear_op is None:

        @torch.library.custom_op("prunedm_nn::cslt_linear", mutates_args=())
        def cslt_linear(
            packed: torch.Tensor,
            x2d: torch.Tensor,
            bias: torch.Tensor | None,
            rows: int,
            alg_id: int,
            split_k: int,
            split_k_mode: int,
        ) -> torch.Tensor:
            return _linear_impl(packed, x2d, bias, rows, alg_id, split_k, split_k_mode)

        @cslt_linear.register_fake
        def _(packed, x2d, bias, rows, alg_id, split_k, split_k_mode):
            return x2d.new_empty((x2d.shape[0], rows))

        _linear_op = cslt_linear
    return _linear_op


def linear(
    packed: torch.Tensor,
    x2d: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    params: tuple[int, int, int] = DEFAULT_PARAMS,
) -> torch.Tensor:
    """x2d [M, K] @ W.T (+ bias) -> [M, rows], W cuSPARSELt-compressed in `packed` ([rows, K] before compression)."""
    alg_id, split_k, split_k_mode = params
    return _registered_op()(packed, x2d.contiguous(), bias, rows, alg_id, split_k, split_k_mode)
