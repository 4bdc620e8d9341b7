"""Triton kernels of the N:M mask ops: nm_mask (keep the n largest |w| of every m) and nm_violations
(count the m-wide groups holding more than n non-zeros), registered as torch.ops.prunedm_triton.*."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunedm.kernels import _op
from prunedm.kernels._op import wrap_triton

# Work per program: rank comparisons for nm_mask (BLOCK_G * M * M), loaded elements for
# nm_violations (BLOCK_G * M). Enough to hide memory latency, few enough to stay in registers.
_COMPARISONS_PER_PROGRAM = 8192
_ELEMENTS_PER_PROGRAM = 4096


def _padded_group_size(m: int) -> int:
    # Block dims must be powers of two; lanes past m are masked off.
    return max(2, triton.next_power_of_2(m))


@triton.jit
def _nm_mask_kernel(
    bits_ptr,
    keep_ptr,
    groups,
    n,
    m,
    MAGNITUDE_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    i = tl.arange(0, M)
    offsets = g[:, None] * m + i[None, :]
    valid = (g[:, None] < groups) & (i[None, :] < m)
    # |w| as the bits of a non-negative float orders like |w| itself, as an integer.
    magnitude = tl.load(bits_ptr + offsets, mask=valid, other=0) & MAGNITUDE_MASK
    # Every NaN, whatever its payload, becomes the one key just above +inf: NaN beats every
    # number and ties with NaN, as in torch.sort.
    key = tl.where(magnitude > INF_BITS, INF_BITS + 1, magnitude)
    # Padding lanes get a key below every real one, so they never outrank an element.
    key = tl.where(valid, key, -1)
    key_j = key[:, None, :]
    key_i = key[:, :, None]
    j_before_i = i[None, None, :] < i[None, :, None]
    # An element's rank is the number of elements that beat it (larger, or equal at a lower index).
    beats = (key_j > key_i) | ((key_j == key_i) & j_before_i)
    rank = tl.sum(beats.to(tl.int32), axis=2)
    tl.store(keep_ptr + offsets, (rank < n).to(tl.uint8), mask=valid)


def _nm_mask_fake(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=torch.bool, device=weight.device)


@_op.register("prunedm_triton::nm_mask", _nm_mask_kernel, _nm_mask_fake)
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest |w| of each m consecutive elements along the last dim."""
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    groups = weight.numel() // m
    if groups == 0:
        return keep
    bits, magnitude_mask, inf_bits = _op.magnitude_bits(weight)
    padded_m = _padded_group_size(m)
    block_g = max(1, _COMPARISONS_PER_PROGRAM // (padded_m * padded_m))
    with _op.on_device_of(weight):
        wrap_triton(_nm_mask_kernel)[(triton.cdiv(groups, block_g),)](
            bits,
            keep.view(torch.uint8),  # bool is stored as one byte of 0 or 1
            groups,
            n,
            m,
            MAGNITUDE_MASK=magnitude_mask,
            INF_BITS=inf_bits,
            M=padded_m,
            BLOCK_G=block_g,
        )
    return keep


@triton.jit
def _nm_violations_kernel(
    bits_ptr,
    partial_ptr,
    groups,
    n,
    m,
    NONZERO_MASK: tl.constexpr,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    i = tl.arange(0, M)
    offsets = g[:, None] * m + i[None, :]
    valid = (g[:, None] < groups) & (i[None, :] < m)
    nonzero = (tl.load(bits_ptr + offsets, mask=valid, other=0) & NONZERO_MASK) != 0
    over = tl.sum(nonzero.to(tl.int32), axis=1) > n
    # One partial count per program, summed on the host side: deterministic, and no 64-bit atomics.
    tl.store(partial_ptr + pid, tl.sum(over.to(tl.int32), axis=0))


def _nm_violations_fake(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device=t.device)


@_op.register("prunedm_triton::nm_violations", _nm_violations_kernel, _nm_violations_fake)
def nm_violations(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Number of m-wide groups along the last dim holding more than n non-zeros (int64 0-d tensor)."""
    groups = t.numel() // m
    if groups == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    bits, nonzero_mask = _op.nonzero_bits(t)
    padded_m = _padded_group_size(m)
    block_g = max(1, _ELEMENTS_PER_PROGRAM // padded_m)
    programs = triton.cdiv(groups, block_g)
    partial = torch.empty(programs, dtype=torch.int32, device=t.device)
    with _op.on_device_of(t):
        wrap_triton(_nm_violations_kernel)[(programs,)](
            bits, partial, groups, n, m, NONZERO_MASK=nonzero_mask, M=padded_m, BLOCK_G=block_g
        )
    return partial.sum()  # int32 partials sum to int64
