"""Training checkpoints without pickle: step-XXXXXXXX/ directories of safetensors and a state.json with each
file's sha256, written whole or not at all (prunedm._atomic.atomic_dir); `latest` names the newest one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prunedm._atomic import atomic_dir, write_text_atomic
from prunedm._integrity import check_optimizer_state, check_tensors, file_sha256

LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{8})")


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


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The optimizer state_dict that optimizer_to_tensors split."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    optimizer.load_state_dict(optimizer_state_from_tensors(tensors, rest))


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory's name (step-XXXXXXXX), or None for other names."""
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def save_checkpoint(
    root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep: int = 2
) -> Path:
    """Write root/step-XXXXXXXX/{<name>.safetensors..., state.json} atomically; keep the newest `keep` (>= 1)."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep_checkpoints must be an integer >= 1, got {keep!r}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        files = {}
        for name, group in tensors.items():
            save_file(_contiguous(group), str(tmp / f"{name}.safetensors"))
            files[f"{name}.safetensors"] = file_sha256(tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state, "files": files}, indent=1))
    mark_latest(root, final, step, keep)
    return final


def mark_latest(root: Path, final: Path, step: int, keep: int) -> None:
    """Point root/latest at the checkpoint `final` of `step` and delete all but the newest `keep`."""
    write_json_atomic(root / LATEST, {"checkpoint": final.name, "step": step})
    for old in checkpoints_newest_first(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints_newest_first(root: Path) -> list[Path]:
    """The checkpoint directories under root (named step-XXXXXXXX), highest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def read_pointer(root: Path) -> str | None:
    """The checkpoint name `latest` holds (None without one); ValueError when it is not a pointer."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
        if not isinstance(name, str) or step_of(Path(name)) is None or Path(name).name != name:
            raise ValueError(f"names {name!r}, not a step-XXXXXXXX directory")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ValueError(f"{pointer}: not a prunedm checkpoint pointer ({exc}); delete it to start afresh") from exc
    return name


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names (the newest step directory when there is no pointer), or None."""
    name = read_pointer(root)
    if name is None:
        found = checkpoints_newest_first(root)
        return found[0] if found else None
    path = root / name
    if not (path / "state.json").exists():
        raise ValueError(f"{root / LATEST} names {path}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors by file name, state) of a checkpoint; ValueError naming the checkpoint when a file is missing,
    truncated, or differs from the sha256 recorded in state.json."""
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("state.json is not a JSON object")
        files = state.get("files")
        if files is not None and not isinstance(files, dict):
            raise ValueError("state.json: files is not a mapping")
        tensors = {}
        for name in names:
            file = path / f"{name}.safetensors"
            if files is not None and files.get(file.name) != file_sha256(file):
                raise ValueError(f"{file.name} differs from the sha256 in state.json (damaged or edited)")
            tensors[name] = load_file(str(file))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"checkpoint {path} cannot be read: {' '.join(str(exc).split())[:300]}") from exc
    return tensors, state


__all__ = [
    "check_optimizer_state",
    "check_tensors",
    "checkpoints_newest_first",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "read_pointer",
    "save_checkpoint",
    "step_of",
]
