"""Chooses the implementation an op runs on: the compiled extension, a Triton kernel, or the reference."""

from __future__ import annotations

import torch

from prunedm import _ext

BACKENDS = ("auto", "reference", "extension", "triton")


def pick_backend(op: str, backend: str, tensor: torch.Tensor) -> str:
    """Resolve `backend` for an op on `tensor`'s device; raise if an explicit choice cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    device = tensor.device
    if backend == "auto":
        if device.type == "cuda":
            if _ext.cuda_kernels_built():
                return "extension"
            if _ext.triton_usable_on(device)[0]:
                return "triton"
            return "reference"
        if device.type == "cpu" and _ext.extension_loaded():
            return "extension"
        return "reference"
    if backend == "extension":
        info = _ext.extension_info()
        key = "cuda" if device.type == "cuda" else "cpu"
        if device.type not in ("cpu", "cuda") or not info[key]["built"]:
            reason = info[key]["reason"] if device.type in ("cpu", "cuda") else f"no kernels for {device.type}"
            raise RuntimeError(f"{op}: the extension backend is not available for {device.type} tensors: {reason}")
    if backend == "triton":
        usable, reason = _ext.triton_usable_on(device)
        if not usable:
            raise RuntimeError(f"{op}: the triton backend cannot run here: {reason}")
    return backend


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listed}")
