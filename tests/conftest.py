"""Shared test setup: markers, the per-dtype tolerance table, and input generators with ties and zeros."""

from __future__ import annotations

import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present; it must be
# switched on before triton (imported by prunedm.kernels) decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tolerances for comparing a fast path against its reference, by dtype (rtol, atol).
TOLERANCES = {
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-12, 1e-12),
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIXTEEN_BIT_DTYPES = (torch.float16, torch.bfloat16)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def weights_with_ties(shape, dtype, seed=0) -> torch.Tensor:
    """Random weights drawn from few distinct magnitudes and both signs, so groups have ties."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.5, 1.0, 2.0])
    w = levels[torch.randint(0, len(levels), shape, generator=g)]
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return (w * sign).to(dtype)


def random_2to4(rows: int, cols: int, dtype, seed=0) -> torch.Tensor:
    """A 2:4-sparse matrix whose groups hold 0, 1 or 2 non-zeros, at random positions."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols // 4, 4, generator=g)
    kept = torch.randint(0, 3, (rows, cols // 4, 1), generator=g)
    ranks = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1).argsort(-1)
    return (dense * (ranks < kept)).reshape(rows, cols).to(dtype)


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a whole test module (`pytest.mark.usefixtures("one_thread_module")`): for
    tiny models, thread start-up and oversubscription would dominate every op. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_sm80 = pytest.mark.skip(reason="needs Sparse Tensor Cores (compute capability >= 8.0)")
    has_cuda = torch.cuda.is_available()
    has_sm80 = has_cuda and torch.cuda.get_device_capability()[0] >= 8
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "sm80" in item.keywords and not has_sm80:
            item.add_marker(skip_sm80)
