"""Checks that a saved file or state is what it claims before anything uses it: a file's sha256, and
optimizer state and tensors shaped like what they are loaded into."""

from __future__ import annotations

import hashlib
import os

import torch


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_optimizer_state(what: str, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """ValueError unless a state dict fits `optimizer`: the same group sizes, state tensors shaped like their
    parameters, scalars as numbers. `what` names the file or object in the message."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes = [len(group["params"]) for group in state["param_groups"]]
    if sizes != [len(group["params"]) for group in optimizer.param_groups]:
        raise ValueError(f"{what}: optimizer state for parameter groups of sizes {sizes}, not these parameters'")
    for index, entries in state["state"].items():
        if not 0 <= index < len(params):
            raise ValueError(f"{what}: optimizer state for parameter {index}, which does not exist")
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() and value.shape != params[index].shape:
                raise ValueError(f"{what}: optimizer {key} of parameter {index} has shape {list(value.shape)}")
            if not torch.is_tensor(value) and not isinstance(value, (int, float)):
                raise ValueError(f"{what}: optimizer {key} of parameter {index} is {value!r}")


def check_tensors(what: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """ValueError unless `got` has exactly `expected`'s names, each with the same shape and dtype."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(f"{what}: tensors missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in expected.items():
        if got[key].shape != value.shape or got[key].dtype != value.dtype:
            raise ValueError(
                f"{what}: {key} is {got[key].dtype} {list(got[key].shape)}, expected {value.dtype} {list(value.shape)}"
            )
