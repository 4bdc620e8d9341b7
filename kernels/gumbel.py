"""Triton kernels of the Gumbel N:M sampling ops, registered as torch.ops.prunedm_triton.gumbel_*.

The noise is the reference's: tl.randint4x is Philox4x32-10 with counter (lo32, hi32 of i // 4, 0, 0)
and key (lo32, hi32 of seed), word i % 4 for element i, and the Gumbel transform runs in float64.
The per-group math follows csrc/include/prunedm/gumbel.h on a [groups, m] tile: fused noise and
top-n or relaxation forward; fused noise, recomputed relaxation and reverse sweep backward. Infinite
logits follow the reference's rule; the pattern kernels refuse m past MAX_PATTERN_TABLE_ENTRIES."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from prunedm.kernels import _op
from prunedm.kernels._op import wrap_triton

# Work per program, in tile elements (groups x padded group size, x padded patterns for patterns).
_ELEMENTS_PER_PROGRAM = 2048
_RANK_COMPARISONS_PER_PROGRAM = 8192


def _pow2(v: int) -> int:
    return max(2, triton.next_power_of_2(v))


@triton.jit
def _gumbel_noise(seed, offsets, COMPUTE: tl.constexpr):
    """Gumbel noise of the elements at flat `offsets` (int64): float64 math, rounded to COMPUTE."""
    r0, r1, r2, r3 = tl.randint4x(seed, offsets >> 2)
    lane = offsets & 3
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    u = (bits.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2^-32
    return (-tl.log(-tl.log(u))).to(COMPUTE)


@triton.jit
def _softmax_rows(alpha, tau):
    """(z, a, row max of z, row sum of exp(z - max)) for z = alpha / tau; -inf lanes get a = 0."""
    z = alpha / tau
    z_max = tl.max(z, axis=1)
    e = tl.exp(z - z_max[:, None])
    total = tl.sum(e, axis=1)
    return z, e / total[:, None], z_max, total


@triton.jit
def _rest_of_softmax(z, is_top):
    """Per row: the largest z other than the top lane and sum exp(z - it) over those lanes."""
    rest = tl.where(is_top, float("-inf"), z)
    rest_max = tl.max(rest, axis=1)
    finite = rest_max > float("-inf")
    shifted = tl.where(finite[:, None], rest - tl.where(finite, rest_max, 0.0)[:, None], float("-inf"))
    return rest_max, tl.sum(tl.exp(shifted), axis=1)


@triton.jit
def _suppress(alpha, z, a, z_max, total, is_top):
    """alpha + log(1 - a): log1p(-a) off the top lane, logsumexp(z without top) - logsumexp(z) on it."""
    rest_max, rest_sum = _rest_of_softmax(z, is_top)
    # Every log and division sees a safe operand, also in the lanes where() then drops.
    log_rest = tl.where(rest_sum > 0, rest_max + tl.log(tl.where(rest_sum > 0, rest_sum, 1.0)), float("-inf"))
    log_all = z_max + tl.log(total)
    return alpha + tl.where(is_top, (log_rest - log_all)[:, None], tl.log(tl.where(is_top, 1.0, 1.0 - a)))


@triton.jit
def _infinity_level(x):
    """1 where x is +inf, -1 where -inf, 0 where finite."""
    return tl.where(x == float("inf"), 1, tl.where(x == float("-inf"), -1, 0))


@triton.jit
def _level_plan(keys, noise, in_group, n, tau):
    """gumbel.h's LevelPlan on a tile: per lane its level by keys / tau (-2 on padding lanes); per row
    the level holding the n-th place and its number of relaxation steps; the active keys (-inf off that level,
    noise on an infinite one) and the lanes pinned at 1."""
    level = tl.where(in_group, _infinity_level(keys / tau), -2)
    above = tl.sum((level == 1).to(tl.int32), axis=1)
    finite = tl.sum((level == 0).to(tl.int32), axis=1)
    active = tl.where(above >= n, 1, tl.where(above + finite >= n, 0, -1))
    steps = tl.where(active == 1, n, tl.where(active == 0, n - above, n - above - finite))
    on_active = level == active[:, None]
    active_keys = tl.where(on_active, tl.where(level == 0, keys, noise), float("-inf"))
    return level, active, steps, active_keys, level > active[:, None]


@triton.jit
def _top_lane(z, lanes):
    """Bool tile marking each row's first argmax of z."""
    top = tl.argmax(z, axis=1, tie_break_left=True)
    return lanes[None, :] == top[:, None]


@triton.jit
def _gumbel_nm_kernel(
    logits_ptr,
    out_ptr,
    groups,
    n,
    m,
    tau,
    seed,
    offset,
    HARD: tl.constexpr,
    COMPUTE: tl.constexpr,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    lanes = tl.arange(0, M)
    offsets = g[:, None] * m + lanes[None, :]
    valid = (g[:, None] < groups) & (lanes[None, :] < m)
    logits = tl.load(logits_ptr + offsets, mask=valid, other=0.0).to(COMPUTE)
    noise = _gumbel_noise(seed, offsets + offset, COMPUTE)
    # Padding lanes get -inf keys and level -2: never kept, and exp(-inf) = 0 in every softmax.
    # Rows past the end keep finite keys.
    in_group = lanes[None, :] < m
    keys = tl.where(in_group, logits + noise, float("-inf"))
    if HARD:
        # An element's rank is the number of elements that beat it: a higher level, or the same level
        # and a larger rank key (the key, or the noise of an infinite one), or equal at a lower index.
        level = tl.where(in_group, _infinity_level(keys), -2)
        rank_key = tl.where(level == 0, keys, noise)
        key_i, key_j = rank_key[:, :, None], rank_key[:, None, :]
        level_i, level_j = level[:, :, None], level[:, None, :]
        j_before_i = lanes[None, None, :] < lanes[None, :, None]
        same_level_beats = (key_j > key_i) | ((key_j == key_i) & j_before_i)
        beats = (level_j > level_i) | ((level_j == level_i) & same_level_beats)
        rank = tl.sum(beats.to(tl.int32), axis=2)
        out = (rank < n).to(COMPUTE)
    else:
        level, active, steps, alpha, pinned = _level_plan(keys, noise, in_group, n, tau)
        out = pinned.to(COMPUTE)
        for k in range(0, n):
            # Rows past their steps compute on zeros (and drop it), so no NaN is ever formed there.
            live = (steps > k)[:, None]
            alpha = tl.where(live, alpha, 0.0)
            z, a, z_max, total = _softmax_rows(alpha, tau)
            out += tl.where(live, a, 0.0)
            if k + 1 < n:
                alpha = _suppress(alpha, z, a, z_max, total, _top_lane(z, lanes))
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _gumbel_nm_backward_kernel(
    grad_ptr,
    logits_ptr,
    out_ptr,
    groups,
    n,
    m,
    tau,
    seed,
    offset,
    COMPUTE: tl.constexpr,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    lanes = tl.arange(0, M)
    offsets = g[:, None] * m + lanes[None, :]
    valid = (g[:, None] < groups) & (lanes[None, :] < m)
    logits = tl.load(logits_ptr + offsets, mask=valid, other=0.0).to(COMPUTE)
    grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0).to(COMPUTE)
    noise = _gumbel_noise(seed, offsets + offset, COMPUTE)
    in_group = lanes[None, :] < m
    keys = tl.where(in_group, logits + noise, float("-inf"))
    level, active, steps, active_keys, pinned = _level_plan(keys, noise, in_group, n, tau)
    # Reverse sweep; g_alpha is the gradient of alpha_{k+1}, each alpha_k recomputed from the keys.
    # A row takes its first `steps` softmaxes only; the others compute on zeros and drop it.
    g_alpha = tl.zeros((BLOCK_G, M), dtype=COMPUTE)
    for step_back in range(0, n):
        k = n - 1 - step_back
        live = (steps > k)[:, None]
        alpha = tl.where(live, active_keys, 0.0)
        for _ in range(0, k):
            z, a, z_max, total = _softmax_rows(alpha, tau)
            alpha = tl.where(live, _suppress(alpha, z, a, z_max, total, _top_lane(z, lanes)), 0.0)
        z, a, z_max, total = _softmax_rows(alpha, tau)
        a_dot_grad = tl.sum(a * grad, axis=1)
        if k + 1 < n:
            is_top = _top_lane(z, lanes)
            rest_max, rest_sum = _rest_of_softmax(z, is_top)
            finite = rest_sum > 0
            q_shift = tl.where(finite, rest_max, 0.0)
            q_norm = tl.where(finite, rest_sum, 1.0)
            q = tl.where(is_top | ~finite[:, None], 0.0, tl.exp(z - q_shift[:, None]) / q_norm[:, None])
            c = tl.where(is_top, 0.0, -g_alpha * a / tl.where(is_top, 1.0, 1.0 - a))
            c_sum = tl.sum(c, axis=1)
            g_top = tl.sum(tl.where(is_top, g_alpha, 0.0), axis=1)
            g_alpha += tl.where(live, (c - a * c_sum[:, None] + g_top[:, None] * (q - a)) / tau, 0.0)
        g_alpha += tl.where(live, a * (grad - a_dot_grad[:, None]) / tau, 0.0)
    # Infinite logits carry no gradient, and neither does a row whose n-th place is on an infinite level.
    g_alpha = tl.where((level == 0) & (active[:, None] == 0), g_alpha, 0.0)
    tl.store(out_ptr + offsets, g_alpha.to(out_ptr.dtype.element_ty), mask=valid)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _nm_block(m: int, hard: bool) -> tuple[int, int]:
    padded = _pow2(m)
    budget = _RANK_COMPARISONS_PER_PROGRAM // padded if hard else _ELEMENTS_PER_PROGRAM
    return padded, max(1, budget // padded)


def _gumbel_nm_sample_fake(
    logits: torch.Tensor, n: int, m: int, tau: float, hard: bool, seed: int, offset: int = 0
) -> torch.Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@_op.register("prunedm_triton::gumbel_nm_sample", _gumbel_nm_kernel, _gumbel_nm_sample_fake)
def gumbel_nm_sample(
    logits: torch.Tensor, n: int, m: int, tau: float, hard: bool, seed: int, offset: int = 0
) -> torch.Tensor:
    """Gumbel N:M sample (hard 0/1 or relaxed) of per-weight logits; see prunedm.ops.gumbel_nm_sample."""
    x = logits.contiguous()
    out = torch.empty_like(x)
    groups = x.numel() // m
    if groups == 0:
        return out
    padded, block_g = _nm_block(m, hard)
    with _op.on_device_of(x):
        wrap_triton(_gumbel_nm_kernel)[(triton.cdiv(groups, block_g),)](
            x, out, groups, n, m, tau, seed, offset,
            HARD=hard, COMPUTE=_compute_dtype(x.dtype), M=padded, BLOCK_G=block_g,
        )  # fmt: skip
    return out


def _gumbel_nm_sample_backward_fake(
    grad, logits, n: int, m: int, tau: float, seed: int, offset: int = 0
) -> torch.Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@_op.register("prunedm_triton::gumbel_nm_sample_backward", _gumbel_nm_backward_kernel, _gumbel_nm_sample_backward_fake)
def gumbel_nm_sample_backward(
    grad: torch.Tensor, logits: torch.Tensor, n: int, m: int, tau: float, seed: int, offset: int = 0
) -> torch.Tensor:
    """Gradient of the relaxed sample with respect to logits, given the sample's gradient."""
    x = logits.contiguous()
    out = torch.empty_like(x)
    groups = x.numel() // m
    if groups == 0:
        return out
    padded, block_g = _nm_block(m, False)
    with _op.on_device_of(x):
        wrap_triton(_gumbel_nm_backward_kernel)[(triton.cdiv(groups, block_g),)](
            grad.contiguous(), x, out, groups, n, m, tau, seed, offset,
            COMPUTE=_compute_dtype(x.dtype), M=padded, BLOCK_G=block_g,
        )  # fmt: skip
    return out


# gumbel_pattern_sample: a [groups, patterns] tile of keys, and the 0/1 pattern table [patterns, m].


@triton.jit
def _load_pattern_tile(
    logits_ptr,
    table_ptr,
    groups,
    num_patterns,
    m,
    seed,
    offset,
    pid,
    COMPUTE: tl.constexpr,
    P: tl.constexpr,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    p = tl.arange(0, P)
    lanes = tl.arange(0, M)
    offsets = g[:, None] * num_patterns + p[None, :]
    valid = (g[:, None] < groups) & (p[None, :] < num_patterns)
    logits = tl.load(logits_ptr + offsets, mask=valid, other=0.0).to(COMPUTE)
    noise = _gumbel_noise(seed, offsets + offset, COMPUTE)
    keys = logits + noise
    table_valid = (p[:, None] < num_patterns) & (lanes[None, :] < m)
    table = tl.load(table_ptr + p[:, None] * m + lanes[None, :], mask=table_valid, other=0.0).to(COMPUTE)
    return g, p, lanes, offsets, valid, keys, noise, table


@triton.jit
def _competing(value, noise, in_range):
    """Per row: only the patterns of the highest level present compete, an infinite one by its noise;
    the others (and padding patterns, level -2) get -inf. Also returns that level per row."""
    level = tl.where(in_range, _infinity_level(value), -2)
    top = tl.max(level, axis=1)
    return tl.where(level == top[:, None], tl.where(level == 0, value, noise), float("-inf")), top


@triton.jit
def _gumbel_pattern_kernel(
    logits_ptr,
    table_ptr,
    out_ptr,
    groups,
    num_patterns,
    m,
    tau,
    seed,
    offset,
    HARD: tl.constexpr,
    COMPUTE: tl.constexpr,
    P: tl.constexpr,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    g, p, lanes, offsets, valid, keys, noise, table = _load_pattern_tile(
        logits_ptr, table_ptr, groups, num_patterns, m, seed, offset, tl.program_id(0), COMPUTE, P, M, BLOCK_G
    )
    in_range = p[None, :] < num_patterns
    if HARD:
        ranked, _top = _competing(keys, noise, in_range)
        chosen = tl.argmax(ranked, axis=1, tie_break_left=True)
        y = (p[None, :] == chosen[:, None]).to(COMPUTE)
    else:
        z, _top = _competing(keys / tau, noise / tau, in_range)
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        y = e / tl.sum(e, axis=1)[:, None]
    mask = tl.sum(y[:, :, None] * table[None, :, :], axis=1)
    out_valid = (g[:, None] < groups) & (lanes[None, :] < m)
    tl.store(out_ptr + g[:, None] * m + lanes[None, :], mask.to(out_ptr.dtype.element_ty), mask=out_valid)


@triton.jit
def _gumbel_pattern_backward_kernel(
    grad_ptr,
    logits_ptr,
    table_ptr,
    out_ptr,
    groups,
    num_patterns,
    m,
    tau,
    seed,
    offset,
    COMPUTE: tl.constexpr,
    P: tl.constexpr,
    M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    g, p, lanes, offsets, valid, keys, noise, table = _load_pattern_tile(
        logits_ptr, table_ptr, groups, num_patterns, m, seed, offset, tl.program_id(0), COMPUTE, P, M, BLOCK_G
    )
    z, top = _competing(keys / tau, noise / tau, p[None, :] < num_patterns)
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    y = e / tl.sum(e, axis=1)[:, None]
    grad_valid = (g[:, None] < groups) & (lanes[None, :] < m)
    grad = tl.load(grad_ptr + g[:, None] * m + lanes[None, :], mask=grad_valid, other=0.0).to(COMPUTE)
    # Each pattern's gradient is the sum of its kept elements' gradients; then softmax's backward.
    grad_y = tl.sum(grad[:, None, :] * table[None, :, :], axis=2)
    y_dot = tl.sum(y * grad_y, axis=1)
    # Infinite logits carry no gradient: with an infinite top level, no pattern's logit has one.
    grad_logits = tl.where(top[:, None] == 0, y * (grad_y - y_dot[:, None]) / tau, 0.0)
    tl.store(out_ptr + offsets, grad_logits.to(out_ptr.dtype.element_ty), mask=valid)


@functools.lru_cache(maxsize=64)
def _pattern_table_cpu(n: int, m: int) -> torch.Tensor:
    from prunedm.ops import reference

    return reference.nm_patterns_ref(n, m, torch.float32)


_TABLES: dict = {}


def _pattern_table(n: int, m: int, device: torch.device) -> torch.Tensor:
    key = (n, m, str(device))
    if key not in _TABLES:
        _TABLES[key] = _pattern_table_cpu(n, m).to(device)
    return _TABLES[key]


# Largest padded C(m, n) x padded m table a pattern program holds: past it a single group's tile
# (keys, table and their [P, M] product) crowds the registers: ptxas -v for sm_80 (fp32) gives 64-96
# registers up to 4096 entries, 163 at 8192, 255 (the cap) at 16384; m = 16, n = 8 is 262144.
MAX_PATTERN_TABLE_ENTRIES = 8192


def gumbel_pattern_fits(n: int, m: int) -> bool:
    """Whether the triton pattern kernels take n:m: the padded [C(m, n), m] table fits one program."""
    return _pow2(math.comb(m, n)) * _pow2(m) <= MAX_PATTERN_TABLE_ENTRIES


def _check_pattern_fits(n: int, m: int) -> None:
    if not gumbel_pattern_fits(n, m):
        patterns = math.comb(m, n)
        raise ValueError(
            f"gumbel_pattern_sample: the triton backend cannot take m = {m} with n = {n}: it holds each group's "
            f"[C(m, n), m] = [{patterns}, {m}] pattern table in one program (padded {_pow2(patterns)} x {_pow2(m)}), "
            f"over its limit of {MAX_PATTERN_TABLE_ENTRIES} entries (m <= 8 always fits); "
            "use backend='extension' or backend='reference' (backend='auto' picks one of them itself)"
        )


def _pattern_block(num_patterns: int, m: int) -> tuple[int, int, int]:
    padded_p, padded_m = _pow2(num_patterns), _pow2(m)
    return padded_p, padded_m, max(1, _ELEMENTS_PER_PROGRAM * 4 // (padded_p * padded_m))


def _pattern_mask_shape(pattern_logits: torch.Tensor, m: int) -> tuple[int, ...]:
    *batch, groups, _ = pattern_logits.shape
    return (*batch, groups * m)


def _gumbel_pattern_sample_fake(
    pattern_logits, n: int, m: int, tau: float, hard: bool, seed: int, offset: int = 0
) -> torch.Tensor:
    return pattern_logits.new_empty(_pattern_mask_shape(pattern_logits, m))


@_op.register("prunedm_triton::gumbel_pattern_sample", _gumbel_pattern_kernel, _gumbel_pattern_sample_fake)
def gumbel_pattern_sample(
    pattern_logits: torch.Tensor, n: int, m: int, tau: float, hard: bool, seed: int, offset: int = 0
) -> torch.Tensor:
    """MaskLLM-style sample over candidate patterns; see prunedm.ops.gumbel_pattern_sample."""
    _check_pattern_fits(n, m)
    x = pattern_logits.contiguous()
    out = x.new_empty(_pattern_mask_shape(x, m))
    num_patterns = x.shape[-1]
    groups = x.numel() // num_patterns
    if groups == 0:
        return out
    padded_p, padded_m, block_g = _pattern_block(num_patterns, m)
    with _op.on_device_of(x):
        wrap_triton(_gumbel_pattern_kernel)[(triton.cdiv(groups, block_g),)](
            x, _pattern_table(n, m, x.device), out, groups, num_patterns, m, tau, seed, offset,
            HARD=hard, COMPUTE=_compute_dtype(x.dtype), P=padded_p, M=padded_m, BLOCK_G=block_g,
        )  # fmt: skip
    return out


def _gumbel_pattern_sample_backward_fake(
    grad, pattern_logits, n: int, m: int, tau: float, seed: int, offset: int = 0
) -> torch.Tensor:
    return torch.empty_like(pattern_logits, memory_format=torch.contiguous_format)


@_op.register(
    "prunedm_triton::gumbel_pattern_sample_backward",
    _gumbel_pattern_backward_kernel,
    _gumbel_pattern_sample_backward_fake,
)
def gumbel_pattern_sample_backward(
    grad: torch.Tensor, pattern_logits: torch.Tensor, n: int, m: int, tau: float, seed: int, offset: int = 0
) -> torch.Tensor:
    """Gradient of the soft pattern mask with respect to pattern_logits, given the mask's gradient."""
    _check_pattern_fits(n, m)
    x = pattern_logits.contiguous()
    out = torch.empty_like(x)
    num_patterns = x.shape[-1]
    groups = x.numel() // num_patterns
    if groups == 0:
        return out
    padded_p, padded_m, block_g = _pattern_block(num_patterns, m)
    with _op.on_device_of(x):
        wrap_triton(_gumbel_pattern_backward_kernel)[(triton.cdiv(groups, block_g),)](
            grad.contiguous(), x, _pattern_table(n, m, x.device), out, groups, num_patterns, m, tau, seed, offset,
            COMPUTE=_compute_dtype(x.dtype), P=padded_p, M=padded_m, BLOCK_G=block_g,
        )  # fmt: skip
    return out


def _save_sampling_inputs(ctx, inputs, output):
    logits, n, m, tau, _hard, seed, offset = inputs
    ctx.save_for_backward(logits)
    ctx.args = (n, m, tau, seed, offset)


_NO_GRADS = (None,) * 6  # n, m, tau, hard, seed, offset


def _nm_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return gumbel_nm_sample_backward(grad, logits, *ctx.args), *_NO_GRADS


def _pattern_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return gumbel_pattern_sample_backward(grad, logits, *ctx.args), *_NO_GRADS


gumbel_nm_sample.register_autograd(_nm_backward, setup_context=_save_sampling_inputs)
gumbel_pattern_sample.register_autograd(_pattern_backward, setup_context=_save_sampling_inputs)
