"""Gumbel N:M sampling: draw N:M masks from learnable logits, per weight (gumbel_nm_sample) or per
candidate pattern (gumbel_pattern_sample, MaskLLM-style), with straight-through gradients."""

from __future__ import annotations

import functools

import torch

from prunedm.ops import _backends, _checks, reference

for _op in ("gumbel_nm_sample", "gumbel_pattern_sample"):
    _backends.declare(_op, reference=getattr(reference, f"{_op}_ref"), extension=_op)


def resolve_seed(seed: int | None) -> int:
    """seed itself, or (for None) a fresh one from torch's default CPU generator, so torch.manual_seed
    makes seed=None calls reproducible."""
    if seed is not None:
        return seed
    return int(torch.empty((), dtype=torch.int64).random_())


def gumbel_nm_sample(
    logits: torch.Tensor,
    n: int = 2,
    m: int = 4,
    tau: float = 1.0,
    hard: bool = True,
    seed: int | None = None,
    *,
    offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Sample an N:M mask from per-weight logits; groups are m consecutive elements along the last dim.

    hard=True (default): a 0/1 mask in logits' dtype with exactly n ones per group, the n largest of
    logits + Gumbel noise, i.e. n draws without replacement (Plackett-Luce) from softmax(logits)
    of the group. Gradients flow straight through, as those of the relaxation below.
    hard=False: the relaxation itself, Xie & Ermon's (2019) successive softmaxes: a_k =
    softmax(alpha_k / tau), alpha_1 = logits + noise, alpha_{k+1} = alpha_k + log(1 - a_k), mask =
    a_1 + ... + a_n; it sums to n per group and tends to the hard sample as tau -> 0 (keep tau <= 1:
    above 1 a dominant element can exceed 1). tau shapes only the relaxation, never the hard draw.

    seed: the noise is Philox4x32-10 keyed by seed and each element's flat index, so the same seed
    gives the same mask on every backend and launch geometry (None: a seed from torch's default
    generator). float16/bfloat16/float32 compute in float32, float64 in float64.
    offset: the flat index of logits' first element in the tensor whose noise is drawn: rows [r0, r1) of
    logits sampled with offset = r0 * (logits[0].numel()) give exactly those rows of the full sample (a
    shard of sharded logits samples as one process would).
    backend: "auto" (default), "reference", "extension" (C++/CUDA) or "triton".

    Infinite logits (every backend alike): +inf = keep, -inf = drop. A group ranks its elements by
    level (+inf, finite, -inf), then by key, an infinite element's key being its noise alone (a
    uniform draw among equal infinite logits). hard: the first n of that order, so a group always
    keeps exactly n (-inf elements only when fewer than n are above -inf). hard=False: levels wholly before
    the n-th place are 1, the level holding it takes the relaxed top-r of its keys for the r places
    left, later levels 0; it still sums to n. Finite logits so large that key / tau overflows
    count as infinite in the relaxation. Gradients reach finite logits only (0 at +-inf).
    NaN logits raise ValueError (one bool read back per call; skipped under torch.compile tracing
    and CUDA graph capture, where the kernels assume there is none)."""
    _checks.check_gumbel_nm(logits, n, m, tau, hard, seed)
    _checks.check_offset("gumbel_nm_sample", offset)
    seed = resolve_seed(seed)
    impl = _backends.pick("gumbel_nm_sample", backend, logits)
    return impl.fn(logits, n, m, float(tau), hard, seed, offset)


def gumbel_pattern_sample(
    pattern_logits: torch.Tensor,
    n: int = 2,
    m: int = 4,
    tau: float = 1.0,
    hard: bool = True,
    seed: int | None = None,
    *,
    offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Sample an N:M mask from logits over each group's candidate patterns (MaskLLM's parametrisation).

    pattern_logits [..., G, C(m, n)] score the n-subsets of each group of m in lexicographic order
    (nm_patterns(n, m): for 2:4 {0,1}, {0,2}, {0,3}, {1,2}, {1,3}, {2,3}); the mask is [..., G*m],
    so logits [R, C/4, 6] give a mask [R, C]. It is gumbel_softmax(pattern_logits, tau) @ patterns:
    hard=True (default) takes the pattern with the largest logit + Gumbel noise (a draw from
    softmax(pattern_logits)) and passes the soft mask's gradient straight through; hard=False
    returns softmax((pattern_logits + noise) / tau) @ patterns. m <= 16 (the triton backend: while
    the [C(m, n), m] pattern table fits one program, see prunedm.kernels.gumbel.gumbel_pattern_fits; "auto"
    then runs the extension or the reference). seed, offset (a flat index into pattern logits) and backend
    as in gumbel_nm_sample.

    Infinite logits: a +inf pattern beats every finite one, a -inf pattern loses to them, and among
    equal infinite logits the noise alone decides (softmax(noise / tau) among them: the limit of
    equal logits going to +-inf); the softmax covers the highest level present only. Gradients
    reach finite logits only. NaN logits raise ValueError, as in gumbel_nm_sample."""
    _checks.check_gumbel_pattern(pattern_logits, n, m, tau, hard, seed)
    _checks.check_offset("gumbel_pattern_sample", offset)
    seed = resolve_seed(seed)
    impl = _backends.pick("gumbel_pattern_sample", backend, pattern_logits)
    if backend == "auto" and impl.accepts is not None and not impl.accepts(n, m):
        # The triton kernel holds the whole pattern table per program; past its limit "auto" takes the reference.
        impl = _backends.pick("gumbel_pattern_sample", "reference", pattern_logits)
    return impl.fn(pattern_logits, n, m, float(tau), hard, seed, offset)


@functools.lru_cache(maxsize=64)
def _patterns_cpu(n: int, m: int) -> torch.Tensor:
    return reference.nm_patterns_ref(n, m, torch.bool)


def nm_patterns(n: int = 2, m: int = 4, *, dtype: torch.dtype = torch.bool, device=None) -> torch.Tensor:
    """[C(m, n), m]: the candidate patterns of gumbel_pattern_sample (n-subsets of range(m), lexicographic)."""
    _checks.check_nm("nm_patterns", n, m)
    return _patterns_cpu(n, m).to(dtype=dtype, device=device)


def pattern_index(mask: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """[..., G] int64: which candidate pattern (row of nm_patterns(n, m)) each m-group of mask [..., G*m]
    follows, by its non-zeros; -1 for a group with other than n non-zeros."""
    _checks.check_tensor("pattern_index", "mask", mask)
    _checks.check_nm("pattern_index", n, m)
    if m > _checks.MAX_PATTERN_GROUP_SIZE:
        raise ValueError(f"pattern_index: m must be in [1, {_checks.MAX_PATTERN_GROUP_SIZE}], got {m}")
    _checks.check_last_dim_groups("pattern_index", "mask", mask, m)
    groups = (mask != 0).reshape(*mask.shape[:-1], mask.shape[-1] // m, m).long()
    codes = (groups << torch.arange(m, device=mask.device)).sum(-1)
    pattern_codes = nm_patterns(n, m, dtype=torch.long, device=mask.device) << torch.arange(m, device=mask.device)
    lookup = torch.full((1 << m,), -1, dtype=torch.long, device=mask.device)
    lookup[pattern_codes.sum(-1)] = torch.arange(pattern_codes.shape[0], device=mask.device)
    return lookup[codes]


def patterns_to_mask(index: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Bool mask [..., G*m] of pattern indices [..., G] (inverse of pattern_index)."""
    chosen = nm_patterns(n, m, device=index.device)[index]
    return chosen.reshape(*index.shape[:-1], index.shape[-1] * m)
