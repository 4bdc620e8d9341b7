"""Readable reference implementations of prunedm's ops: the specification every fast path is tested against.

Each ``<op>_ref`` favours clarity over speed and runs on any device. Arguments are assumed valid
(the public functions in :mod:`prunedm.ops` check them first)."""

from __future__ import annotations

import torch

# 2:4 metadata nibble (idx0 | idx1 << 2) for each non-zero pattern of a 4-wide group (bit i set
# when element i is non-zero). Two non-zeros name themselves; with fewer, zero slots complete the
# pair exactly as CUTLASS's reference converter does ({}/{2}/{3} -> (2,3), {0} -> (0,2),
# {1} -> (1,2)), so that packed bytes match torch.sparse. Three or four non-zeros cannot be
# packed; compress_2to4 refuses them, and their entries are never used.
_NIBBLE_FOR_NONZERO_BITS = (
    0b1110, 0b1000, 0b1001, 0b0100,  # {}, {0}, {1}, {0,1}
    0b1110, 0b1000, 0b1001, 0b0100,  # {2}, {0,2}, {1,2}, {0,1,2}
    0b1110, 0b1100, 0b1101, 0b0100,  # {3}, {0,3}, {1,3}, {0,1,3}
    0b1110, 0b1100, 0b1101, 0b0100,  # {2,3}, {0,2,3}, {1,2,3}, {0,1,2,3}
)  # fmt: skip

COLS_PER_META = 16  # dense columns described by one int16 metadata element
ROW_TILE = 32  # the sm80 metadata layout interleaves rows in tiles of 32


def nm_mask_ref(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive elements along the last dim.

    Ties go to the lower index; NaN counts as larger than any number (torch.sort's order)."""
    groups = weight.abs().reshape(*weight.shape[:-1], weight.shape[-1] // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(weight.shape)


def nm_violations_ref(t: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Number of m-wide groups along the last dim holding more than n non-zeros (int64 scalar)."""
    nonzeros = (t != 0).reshape(*t.shape[:-1], t.shape[-1] // m, m).sum(-1)
    return (nonzeros > n).sum()


def is_nm_sparse_ref(t: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    return int(nm_violations_ref(t, n, m)) == 0


def conv_weight_to_matrix_ref(w: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, kh, kw] -> [Cout, kh*kw*Cin], K ordered (kh, kw, Cin) as in NHWC implicit GEMM."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def matrix_to_conv_weight_ref(mat: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of conv_weight_to_matrix_ref: [Cout, kh*kw*Cin] -> [Cout, Cin, kh, kw]."""
    cout, cin, kh, kw = shape
    return mat.reshape(cout, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


def meta_offsets_sm80_ref(rows: int, meta_cols: int, device=None) -> torch.Tensor:
    """[rows, meta_cols] int64: where each logical metadata element is stored in the sm80 layout.

    Rows are interleaved within 32-row tiles (row r of a tile goes to 4*(r%8) + r//8), each 2x2
    block is transposed, and the matrix is stored column-major interleaved by 2 (CUTLASS's
    ColumnMajorInterleaved<2>)."""
    row = torch.arange(rows, device=device).unsqueeze(1)
    col = torch.arange(meta_cols, device=device).unsqueeze(0)
    in_tile = row % ROW_TILE
    r = row - in_tile + (in_tile % 8) * 4 + in_tile // 8
    stored_row = (r - r % 2) + col % 2  # the 2x2 transpose swaps the low bits of row and column
    stored_col_low = r % 2
    return (col // 2) * rows * 2 + stored_row * 2 + stored_col_low


def compress_2to4_ref(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2-D 2:4-sparse matrix into (values [R, C/2], meta [R, C/16] int16, sm80 layout)."""
    rows, cols = dense.shape
    groups = dense.reshape(rows, cols // 4, 4)
    weights = torch.tensor([1, 2, 4, 8], device=dense.device)
    nonzero_bits = ((groups != 0).long() * weights).sum(-1)
    table = torch.tensor(_NIBBLE_FOR_NONZERO_BITS, device=dense.device)
    nibbles = table[nonzero_bits]  # [R, C/4]
    index0, index1 = nibbles & 3, nibbles >> 2
    kept = torch.stack((groups.gather(-1, index0[..., None]), groups.gather(-1, index1[..., None])), -1)
    values = kept.reshape(rows, cols // 2)

    # Four nibbles per int16, the first group in the lowest bits.
    shifts = torch.tensor([0, 4, 8, 12], device=dense.device)
    meta_logical = (nibbles.reshape(rows, cols // COLS_PER_META, 4) << shifts).sum(-1)
    meta = torch.empty(rows * (cols // COLS_PER_META), dtype=torch.int64, device=dense.device)
    meta[meta_offsets_sm80_ref(rows, cols // COLS_PER_META, dense.device).reshape(-1)] = meta_logical.reshape(-1)
    # Reinterpret the low 16 bits as int16 (values above 0x7fff become negative, as in CUTLASS).
    meta = ((meta + 2**15) % 2**16 - 2**15).to(torch.int16)
    return values, meta.reshape(rows, cols // COLS_PER_META)


def decompress_2to4_ref(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of compress_2to4_ref: the dense [R, 2*values.shape[1]] matrix."""
    rows, half_cols = values.shape
    cols = half_cols * 2
    offsets = meta_offsets_sm80_ref(rows, cols // COLS_PER_META, values.device)
    meta_logical = meta.reshape(-1).long()[offsets.reshape(-1)].reshape(rows, cols // COLS_PER_META) & 0xFFFF
    shifts = torch.tensor([0, 4, 8, 12], device=values.device)
    nibbles = ((meta_logical.unsqueeze(-1) >> shifts) & 0xF).reshape(rows, cols // 4)
    dense = torch.zeros(rows, cols // 4, 4, dtype=values.dtype, device=values.device)
    kept = values.reshape(rows, cols // 4, 2)
    dense.scatter_(-1, (nibbles & 3)[..., None], kept[..., 0:1])
    dense.scatter_(-1, (nibbles >> 2)[..., None], kept[..., 1:2])
    return dense.reshape(rows, cols)


# Gumbel N:M sampling ----------------------------------------------------------------------------
#
# Noise: element i of a sampled tensor (flat index, row-major, plus the op's offset, which makes a
# shard starting at flat element `offset` of a larger tensor draw that tensor's noise) draws word i % 4
# of Philox4x32-10 with counter (lo32(i // 4), hi32(i // 4), 0, 0) and key (lo32(seed), hi32(seed)); its Gumbel
# noise is -log(-log(u)), u = (bits + 1/2) / 2^32, computed in float64 and rounded once to the
# compute dtype (float64 for float64 logits, float32 otherwise). csrc/include/prunedm/philox.h
# and the Triton kernels draw the same bits, so every backend samples the same masks.

_MASK32 = 0xFFFF_FFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (Weyl sequence)
_PHILOX_ROUNDS = 10


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32 bits of a * b for uint32 values held in int64, without overflowing int64:
    the product is assembled from 16-bit halves."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    low = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    high = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return high, low


def philox4x32_10_ref(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al. 2011) of int64 tensors holding uint32 counter words, key two uint32 ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def philox_bits_at_ref(seed: int, index: torch.Tensor) -> torch.Tensor:
    """int64 like index: the 32 random bits (0 <= v < 2^32) of the elements at flat positions `index` under seed."""
    block = index >> 2
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    zero = torch.zeros_like(block)
    words = torch.stack(philox4x32_10_ref((block & _MASK32, block >> 32, zero, zero), key), -1)
    return words.gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)


def philox_bits_ref(seed: int, numel: int, device=None, offset: int = 0) -> torch.Tensor:
    """int64 [numel]: the 32 random bits of elements offset..offset+numel-1 under seed (one Philox call per 4)."""
    first = offset >> 2
    blocks = torch.arange(first, (offset + numel + 3) // 4, dtype=torch.int64, device=device)
    zero = torch.zeros_like(blocks)
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    words = philox4x32_10_ref((blocks & _MASK32, blocks >> 32, zero, zero), key)
    return torch.stack(words, -1).reshape(-1)[offset - 4 * first :][:numel]


def gumbel_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sampling math runs in: float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gumbel_noise_ref(
    seed: int, shape, dtype: torch.dtype = torch.float32, device=None, offset: int = 0
) -> torch.Tensor:
    """Standard Gumbel noise of a tensor of `shape` under seed, in `dtype` (computed in float64); its first
    element draws the noise of flat index `offset`."""
    numel = 1
    for size in shape:
        numel *= size
    u = (philox_bits_ref(seed, numel, device, offset).double() + 0.5) * 2.0**-32
    return (-torch.log(-torch.log(u))).to(dtype).reshape(shape)


def _log1m_softmax_ref(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """log(1 - a) for a = softmax(z) along the last dim, exact where a rounds to 1: at the (first)
    argmax it is logsumexp(z without it) - logsumexp(z); elsewhere a <= 1/2 and log1p(-a) is accurate."""
    top = torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).bool()
    others = z.masked_fill(top, float("-inf"))
    # Both log-sums are taken relative to their maxima (as csrc/include/prunedm/gumbel.h does): for
    # huge z, logsumexp(others) - logsumexp(z) would cancel to 0. The maxima cancel, so they are
    # detached. A row whose other entries are all -inf has log(1 - a_top) = -inf; it computes on
    # zeros (a NaN there would reach the gradient even through where()).
    z_max = z.detach().amax(-1, keepdim=True)
    rest_max = others.detach().amax(-1, keepdim=True)
    has_rest = rest_max > float("-inf")
    shift = torch.where(has_rest, rest_max, 0)
    rest_sum = torch.exp(torch.where(has_rest, others, 0) - shift).sum(-1, keepdim=True)
    rest = torch.where(has_rest, torch.log(rest_sum) + (shift - z_max), float("-inf"))
    log_total = torch.log(torch.exp(z - z_max).sum(-1, keepdim=True))
    # masked_fill keeps log1p's gradient finite at the argmax, where where() drops it anyway.
    return torch.where(top, rest - log_total, torch.log1p(-a.masked_fill(top, 0)))


def relaxed_top_n_ref(keys: torch.Tensor, n: int, tau: float, steps: torch.Tensor | None = None) -> torch.Tensor:
    """The relaxed top-n along the last dim: Xie & Ermon's (2019) successive softmaxes.

    alpha_1 = keys; a_k = softmax(alpha_k / tau); alpha_{k+1} = alpha_k + log(1 - a_k); the result is
    a_1 + ... + a_n. It sums to n and tends to the hard top-n as tau -> 0. Differentiable. steps
    (int, broadcast against keys[..., :1]): a row takes only its first steps[row] <= n softmaxes;
    a row needs at least that many keys above -inf."""
    alpha, soft = keys, torch.zeros_like(keys)
    for k in range(n):
        live = None if steps is None else steps > k
        # Rows that are done compute on zeros, so no NaN reaches even the branch where() drops.
        z = (alpha if live is None else torch.where(live, alpha, 0)) / tau
        a = torch.softmax(z, -1)
        soft = soft + (a if live is None else torch.where(live, a, 0))
        if k + 1 < n:
            step = alpha + _log1m_softmax_ref(z, a)
            alpha = step if live is None else torch.where(live, step, 0)
    return soft


def _hard_top_n_ref(keys: torch.Tensor, n: int) -> torch.Tensor:
    """0/1 tensor (keys' dtype) keeping the n largest keys along the last dim; ties to the lower index."""
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(keys).scatter_(-1, order[..., :n], 1.0)


def _infinity_level(t: torch.Tensor) -> torch.Tensor:
    """int64 like t: 1 where t is +inf, -1 where -inf, 0 where finite."""
    return torch.isposinf(t).long() - torch.isneginf(t).long()


def _ranked_order_ref(level: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim by level, then key, descending; ties to the lower index (stable sorts)."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    by_level = torch.sort(level.gather(-1, order), dim=-1, descending=True, stable=True).indices
    return order.gather(-1, by_level)


def gumbel_nm_sample_ref(
    logits: torch.Tensor, n: int = 2, m: int = 4, tau: float = 1.0, hard: bool = True, seed: int = 0, offset: int = 0
) -> torch.Tensor:
    """Gumbel N:M sample of per-weight logits, in logits' dtype; groups are m consecutive elements (last dim).

    keys = logits + Gumbel noise (compute dtype). hard=True: 1 for the n largest keys of each group
    (ties to the lower index), 0 elsewhere: a Plackett-Luce draw of n without replacement from
    softmax(logits); its gradient is the relaxation's (straight-through). hard=False: the
    relaxation relaxed_top_n_ref(keys, n, tau) itself. tau only shapes the relaxation.

    Infinite logits (the spec every backend follows; NaN is rejected by prunedm.ops): +inf means keep,
    -inf drop. Each group ranks its elements by level (+inf, then finite, then -inf) and, within a
    level, by key, where an infinite element's key is its noise alone (a uniform draw among equal
    infinite logits). hard: the n first of that order, so a group always keeps exactly n (-inf
    elements only when fewer than n are above -inf). hard=False: in that order, the levels wholly
    before the n-th place are 1 (pinned), the level holding the n-th place takes the relaxed top-r of
    its keys for the r places left, later levels are 0; the mask still sums to n. An element whose
    key / tau overflows counts as infinite in the relaxation. Gradients reach finite logits only.
    offset: logits[0]'s flat index in the tensor whose noise is drawn (a shard samples as the whole would)."""
    compute = gumbel_compute_dtype(logits.dtype)
    noise = gumbel_noise_ref(seed, logits.shape, compute, logits.device, offset)
    grouped = (*logits.shape[:-1], logits.shape[-1] // m, m)
    keys = (logits.to(compute) + noise).reshape(grouped)
    noise = noise.reshape(grouped)
    soft = _relaxed_levels_ref(keys, noise, n, tau)
    if hard:
        level = _infinity_level(keys.detach())
        order = _ranked_order_ref(level, torch.where(level == 0, keys.detach(), noise))
        chosen = torch.zeros_like(keys).scatter_(-1, order[..., :n], 1.0)
        # chosen + (soft - soft.detach()) is exactly chosen, with soft's gradient.
        soft = chosen + (soft - soft.detach())
    return soft.reshape(logits.shape).to(logits.dtype)


def _relaxed_levels_ref(keys: torch.Tensor, noise: torch.Tensor, n: int, tau: float) -> torch.Tensor:
    """The relaxation of gumbel_nm_sample_ref on grouped keys [..., m], levels by keys / tau."""
    level = _infinity_level((keys / tau).detach())
    above = (level == 1).sum(-1, keepdim=True)
    finite = (level == 0).sum(-1, keepdim=True)
    # The level holding the n-th place: +inf when it fills n, else finite when it fills the rest, else -inf.
    active = torch.where(above >= n, 1, torch.where(above + finite >= n, 0, -1))
    steps = torch.where(active == 1, n, torch.where(active == 0, n - above, n - above - finite))
    active_keys = torch.where(level == active, torch.where(level == 0, keys, noise), float("-inf"))
    return (level > active).to(keys.dtype) + relaxed_top_n_ref(active_keys, n, tau, steps)


def nm_patterns_ref(n: int = 2, m: int = 4, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[C(m, n), m] 0/1: the candidate patterns, the n-subsets of range(m) in lexicographic order."""
    import itertools

    rows = [[1.0 if i in kept else 0.0 for i in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows, dtype=dtype, device=device).reshape(-1, m)


def gumbel_pattern_sample_ref(
    pattern_logits: torch.Tensor,
    n: int = 2,
    m: int = 4,
    tau: float = 1.0,
    hard: bool = True,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """MaskLLM-style sample: pattern_logits [..., G, C(m, n)] -> mask [..., G*m] in pattern_logits' dtype.

    keys = pattern_logits + Gumbel noise. hard=False: softmax(keys / tau) @ patterns. hard=True: the
    pattern with the largest key (the first on ties), a draw from softmax(pattern_logits), with the
    soft mask's gradient (straight-through).

    Infinite logits: a +inf pattern beats every finite one, a -inf pattern loses to them; among equal
    infinite logits the noise alone decides (their softmax is softmax(noise / tau)), which is the
    limit of equal logits going to +-inf. So the softmax runs over the highest level present only
    (an overflowing key / tau counts as infinite there); gradients reach finite logits only. offset as in
    gumbel_nm_sample_ref (a flat index into the pattern logits)."""
    compute = gumbel_compute_dtype(pattern_logits.dtype)
    noise = gumbel_noise_ref(seed, pattern_logits.shape, compute, pattern_logits.device, offset)
    keys = pattern_logits.to(compute) + noise
    patterns = nm_patterns_ref(n, m, compute, pattern_logits.device)
    z = keys / tau
    level = _infinity_level(z.detach())
    top = level == level.amax(-1, keepdim=True)
    scores = torch.where(top, torch.where(level == 0, z, noise / tau), float("-inf"))
    mask = torch.softmax(scores, -1) @ patterns
    if hard:
        hard_level = _infinity_level(keys.detach())
        hard_top = hard_level == hard_level.amax(-1, keepdim=True)
        ranked = torch.where(hard_top, torch.where(hard_level == 0, keys.detach(), noise), float("-inf"))
        chosen = patterns[ranked.argmax(-1)]
        mask = chosen + (mask - mask.detach())
    return mask.reshape(*pattern_logits.shape[:-2], pattern_logits.shape[-2] * m).to(pattern_logits.dtype)


def nm_set_probabilities_ref(logits: torch.Tensor, n: int) -> torch.Tensor:
    """[..., C(m, n)]: the probability that gumbel_nm_sample keeps each candidate set (nm_patterns_ref order)
    of a group with logits [..., m]: n draws without replacement from softmax(logits), summed over the
    set's n! orders. For checking samplers; the cost grows as C(m, n) * n!."""
    import itertools

    p = torch.softmax(logits.double(), -1)
    columns = []
    for kept in itertools.combinations(range(logits.shape[-1]), n):
        total = torch.zeros_like(p[..., 0])
        for order in itertools.permutations(kept):
            prob, used = torch.ones_like(total), torch.zeros_like(total)
            for i in order:
                prob = prob * p[..., i] / (1 - used)
                used = used + p[..., i]
            total = total + prob
        columns.append(total)
    return torch.stack(columns, -1)


# 2:4 sparse linear / conv with a fused epilogue -------------------------------------------------
#
# The spec of prunedm.ops.sparse_linear_2to4 / sparse_conv2d_2to4: decompress the weight, run the
# dense op, then bias, activation and residual, all in the compute dtype (float32 for 16-bit
# inputs, as the kernels accumulate), rounding to the input's dtype once at the end.

ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")


def sparse_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16 inputs, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def apply_activation_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x) for an activation name in ACTIVATIONS (gelu: erf form; gelu_tanh: tanh approximation)."""
    F = torch.nn.functional
    if activation == "relu":
        return F.relu(x)
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return x


def _epilogue_ref(out, activation, residual, dtype):
    out = apply_activation_ref(out, activation)
    if residual is not None:
        out = out + residual.to(out.dtype)
    return out.to(dtype)


def sparse_linear_2to4_ref(input, values, meta, bias=None, activation="none", residual=None) -> torch.Tensor:
    """act(input @ W.T + bias) + residual with W = decompress_2to4_ref(values, meta) of shape [out, K]."""
    compute = sparse_compute_dtype(input.dtype)
    weight = decompress_2to4_ref(values, meta).to(compute)
    out = torch.nn.functional.linear(input.to(compute), weight, None if bias is None else bias.to(compute))
    return _epilogue_ref(out, activation, residual, input.dtype)


def sparse_conv2d_2to4_ref(
    input, values, meta, weight_shape, bias=None, stride=1, padding=0, dilation=1, activation="none", residual=None
) -> torch.Tensor:
    """act(conv2d(input, W, bias, stride, padding, dilation)) + residual, groups=1, with
    W = matrix_to_conv_weight_ref(decompress_2to4_ref(values, meta), weight_shape) (K in (kh, kw, Cin) order)."""
    compute = sparse_compute_dtype(input.dtype)
    weight = matrix_to_conv_weight_ref(decompress_2to4_ref(values, meta), weight_shape).to(compute)
    out = torch.nn.functional.conv2d(
        input.to(compute), weight, None if bias is None else bias.to(compute), stride, padding, dilation
    )
    return _epilogue_ref(out, activation, residual, input.dtype)
