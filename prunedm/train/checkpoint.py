"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is a directory step-XXXXXXXX/ holding model, EMA and optimizer tensors, RNG states and a
state.json; it is written under a temporary name and renamed into place, so a killed run never
leaves a half-written checkpoint behind, and `latest` names the newest complete one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors (for safetensors) and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def write_json_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep: int = 2
) -> Path:
    """Write root/step-XXXXXXXX/{<name>.safetensors..., state.json} atomically; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        for name, group in tensors.items():
            save_file(_contiguous(group), str(tmp / f"{name}.safetensors"))
        write_json_atomic(tmp / "state.json", {"step": step, **state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(root / LATEST, {"checkpoint": final.name, "step": step})
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{pointer}: not a prunedm checkpoint pointer ({exc}); delete it to start afresh") from exc
    path = root / name
    if not (path / "state.json").exists():
        raise ValueError(f"{pointer} names {path}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    try:
        tensors = {name: load_file(str(path / f"{name}.safetensors")) for name in names}
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc
    return tensors, state
