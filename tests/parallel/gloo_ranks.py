"""The one way the parallel tests run code on several gloo processes (CPU): spawn_ranks(world, out, body, file)
runs body(rank, out) -> tensors on every rank and writes them (rank 0's, or each rank's when `file` holds
"{rank}") to out/file."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file


def _rank(rank: int, world: int, out: str, body, file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store-{world}", rank=rank, world_size=world)
    try:
        results = body(rank, out)
        if rank == 0 or "{rank}" in file:
            save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/{file.format(rank=rank)}")
    finally:
        dist.destroy_process_group()


def spawn_ranks(world: int, out: str | Path, body, file: str) -> None:
    """Run body(rank, out) on `world` gloo processes (body: a module-level function, for pickling)."""
    mp.spawn(_rank, args=(world, str(out), body, file), nprocs=world, join=True)
