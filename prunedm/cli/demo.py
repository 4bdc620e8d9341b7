"""`prunedm demo`: prune DiT-XL/2-shaped weights to 2:4, pack them, and prove the packing exact."""

from __future__ import annotations

import json
import time

import torch

import prunedm
from prunedm import ops

# Linear layers of one DiT-XL/2 block (hidden 1152, MLP 4608): (name, out_features, in_features).
DIT_XL_BLOCK_LINEARS = [
    ("attn.to_qkv", 3 * 1152, 1152),
    ("attn.to_out", 1152, 1152),
    ("ff.net.0.proj", 4608, 1152),
    ("ff.net.2", 1152, 4608),
]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def _sparse_matmul_check(pruned: torch.Tensor, gen: torch.Generator) -> str:
    """On a GPU, multiply through torch's sparse tensor cores and compare with dense."""
    if pruned.device.type != "cuda":
        return "sparse matmul needs a GPU (skipped)"
    x = torch.randn(pruned.shape[1], 64, generator=gen).to(pruned.device, torch.float16)
    sparse = ops.to_semi_structured(pruned)
    diff = float((torch.mm(sparse, x) - torch.mm(pruned, x)).abs().max())
    return f"sparse matmul max |diff| vs dense {diff:.1e}"


def run_demo(device: str = "auto", seed: int = 0) -> int:
    dev = _device(device)
    print("prunedm", prunedm.__version__, "on", dev)
    print(json.dumps(prunedm.extension_info(), indent=1))
    gen = torch.Generator().manual_seed(seed)
    total_dense = total_packed = 0
    for name, out_features, in_features in DIT_XL_BLOCK_LINEARS:
        weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(dev, torch.float16)
        start = time.perf_counter()
        mask = ops.nm_mask(weight)
        pruned = weight * mask
        values, meta = ops.compress_2to4(pruned)
        restored = ops.decompress_2to4(values, meta)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if not torch.equal(restored, pruned):
            raise RuntimeError(f"{name}: decompress(compress(w)) differs from w")
        reference_values, reference_meta = ops.compress_2to4(pruned.cpu(), backend="reference")
        if not (torch.equal(values.cpu(), reference_values) and torch.equal(meta.cpu(), reference_meta)):
            raise RuntimeError(f"{name}: packed bytes differ from the reference")
        matmul_note = _sparse_matmul_check(pruned, gen)
        dense_bytes = weight.numel() * weight.element_size()
        packed_bytes = values.numel() * values.element_size() + meta.numel() * meta.element_size()
        total_dense += dense_bytes
        total_packed += packed_bytes
        print(
            f"{name:14s} [{out_features}x{in_features}] kept {mask.float().mean():.2f} of weights, "
            f"packed {packed_bytes / dense_bytes:.4f} of dense bytes, round trip exact, "
            f"{matmul_note}, {elapsed_ms:.0f} ms"
        )
    print(
        f"block total: {total_packed / 2**20:.2f} MiB packed vs {total_dense / 2**20:.2f} MiB dense "
        f"({total_packed / total_dense:.4f}; 9/16 = 0.5625)"
    )
    return 0
