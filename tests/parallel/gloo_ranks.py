"""The one way the parallel tests run code on several gloo processes (CPU): spawn_ranks(world, out, body, file)
runs body(rank, out) -> tensors on every rank and writes them (rank 0's, or each rank's when `file` holds
"{rank}") to out/file; start_ranks(fn, args, world) runs fn(rank, *args) on `world` processes. On Linux the
ranks are forked from the test process, so they inherit its imports (torch, diffusers, prunedm: seconds per rank
under a spawn) instead of importing them again; elsewhere they are spawned."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

START = "fork" if sys.platform == "linux" else "spawn"


def _one_thread(rank: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share 2 cores
    fn(rank, *args)


def start_ranks(fn, args: tuple, world: int) -> None:
    """fn(rank, *args) on `world` processes with one thread each, joined; a failing rank fails the call."""
    mp.start_processes(_one_thread, args=(fn, args), nprocs=world, join=True, start_method=START)


def _rank(rank: int, world: int, out: str, body, file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store-{world}", rank=rank, world_size=world)
    try:
        results = body(rank, out)
        if rank == 0 or "{rank}" in file:
            save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/{file.format(rank=rank)}")
    finally:
        dist.destroy_process_group()


def spawn_ranks(world: int, out: str | Path, body, file: str) -> None:
    """Run body(rank, out) on `world` gloo processes (body: a module-level function, for spawn's pickling)."""
    start_ranks(_rank, (world, str(out), body, file), world)
