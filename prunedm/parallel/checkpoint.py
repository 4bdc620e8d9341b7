"""Sharded checkpoints through torch.distributed.checkpoint (DCP): every rank writes its shards into one
directory that appears whole or not at all, and any number of ranks (one process included) reads it back,
DCP resharding the row-sharded tensors. Beside the shards: prunedm.json (metadata, rank 0) and
rng-<rank>.safetensors (each rank's global RNG streams, restored on the same number of ranks)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from prunedm._atomic import atomic_dir
from prunedm.parallel.fsdp import world_size

META_FILE = "prunedm.json"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when torch.distributed is not initialised: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast_path(path: Path | None) -> Path:
    """Rank 0's path on every rank (as bytes in a tensor: no pickling)."""
    if world_size() == 1:
        return path
    data = torch.zeros(4096, dtype=torch.uint8)
    if _rank() == 0:
        raw = os.fsencode(path)
        data[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return Path(os.fsdecode(bytes(data[data != 0].tolist())))


def _all_ok(ok: bool) -> bool:
    if world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag) == 0


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, rank_file=None) -> None:
    """Write `tensors` (plain tensors: the same on every rank, written once; DTensors: each rank its shards)
    and `meta` (JSON) to the directory `path`, replacing it only once every rank has written (collective:
    every rank calls it). rank_file(file path) writes this rank's extra file (e.g. its RNG state)."""
    scope = atomic_dir(path) if _rank() == 0 else None
    tmp = _broadcast_path(scope.__enter__() if scope is not None else None)
    error: BaseException | None = None
    try:
        with _quiet_single_process():
            dcp.save(tensors, checkpoint_id=str(tmp))
        if rank_file is not None:
            rank_file(tmp / f"rng-{_rank()}.safetensors")
        if _rank() == 0:
            (tmp / META_FILE).write_text(json.dumps({**meta, "world_size": world_size()}))
    except BaseException as exc:  # every rank must learn that one failed before rank 0 commits
        error = exc
    ok = _all_ok(error is None)
    if scope is not None:
        if ok:
            scope.__exit__(None, None, None)
        else:
            failure = error or RuntimeError(f"{path}: another rank failed to write its shards")
            scope.__exit__(type(failure), failure, failure.__traceback__)
    if dist.is_initialized():
        dist.barrier()
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"{path}: another rank failed to write its shards; nothing was written")


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint written by save(); ValueError naming the directory if it is not one."""
    file = Path(path) / META_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a prunedm sharded checkpoint ({type(exc).__name__}: {exc})"[:300]) from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: {META_FILE} does not hold a JSON object")
    return meta


def load(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Read a checkpoint's tensors into `tensors` in place (DTensors: this rank's shards, on any mesh)."""
    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises its own CheckpointException for missing keys and shapes
        raise ValueError(f"{path}: cannot read it into this learner ({' '.join(str(exc).split())[:300]})") from exc


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an optimizer's lazily built state (one step at lr 0 on zero gradients, which leaves the
    parameters bit for bit as they were), so that a checkpoint can be read into it; nothing if it has state."""
    if optimizer.state:
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    for param in params:
        param.grad = None


def rank_file(path: str | os.PathLike) -> Path | None:
    """This rank's file (save()'s rank_file) in checkpoint `path`, if it has one."""
    file = Path(path) / f"rng-{_rank()}.safetensors"
    return file if file.exists() else None
