"""A learner's state in and out of safetensors: tensors + JSON metadata with a checksum, written atomically,
the global RNG streams a training loop draws from, optimizers flattened to tensors, and StateFile, the
generic save/resume flow every learner (the N:M mask learners, the structural gates) uses."""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from prunedm._atomic import atomic_file
from prunedm._integrity import check_optimizer_state, check_tensors


def _flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json-able rest) of an optimizer's state dict, for a safetensors file."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(prefix: str, tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- state files: what a killed run needs to continue exactly, checked before anything is touched ----


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """The global torch RNG streams a training loop draws from (the CPU one, and every CUDA device's
    once CUDA is in use), as uint8 tensors keyed rng.cpu and rng.cuda.<index>."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state.cpu()
    return tensors


def check_rng_tensors(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError unless `tensors` holds a CPU RNG state (and CUDA ones, if any) of the right size."""
    expected = torch.get_rng_state()
    states = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    if "rng.cpu" not in states:
        raise ValueError(f"{what}: no RNG state (rng.cpu; written by an older prunedm?): cannot resume exactly")
    for key, value in states.items():
        shape_ok = value.shape == expected.shape if key == "rng.cpu" else value.dim() == 1
        if value.dtype != torch.uint8 or not shape_ok or not (key == "rng.cpu" or key[9:].isdigit()):
            raise ValueError(f"{what}: {key} is not an RNG state ({value.dtype}, {list(value.shape)})")
    if sorted(states) != sorted(["rng.cpu", *(f"rng.cuda.{i}" for i in range(len(states) - 1))]):
        raise ValueError(f"{what}: CUDA RNG states {sorted(states)[:4]} are not numbered 0, 1, ...")


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set the global RNG streams from rng_state_tensors()' output. CUDA streams are set where CUDA is in
    use with the same device count (a run moved to another machine cannot continue a GPU stream)."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_state_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write tensors + JSON metadata (under "prunedm", with the tensors' sha256) whole or not at all."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps({**meta, "sha256": tensors_digest(tensors)}, default=json_default)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"prunedm": text})


def load_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by save_state_file; ValueError naming the file when it is
    unreadable, truncated, or its tensors do not match the checksum recorded in it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = json.loads(header["prunedm"])
    except KeyError:
        raise ValueError(f"{path}: not a prunedm state file (no prunedm metadata)") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: unreadable or truncated ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(meta, dict) or meta.get("sha256") != tensors_digest(tensors):
        raise ValueError(f"{path}: its tensors do not match the checksum recorded in it (damaged or edited)")
    return tensors, meta


def check_step_meta(what: str, meta: dict) -> None:
    """ValueError unless the metadata's seed and step are non-negative integers."""
    for key in ("seed", "step"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise ValueError(f"{what}: state {key} must be a non-negative integer, got {meta[key]!r}")


class StateFile:
    """A learner's state in and out of a safetensors file, whole or not at all. The flow is generic; a
    learner supplies its tensors (_state_tensors, saved as learner.<key>), its optimizers (<prefix>.<i>.<key>),
    the model weights it trains (model.<i>), JSON-able extra state, and an identity (_identity: class,
    settings, targets) that must match on load. Every file carries the global RNG streams, seed and step."""

    seed: int
    step_count: int

    # Hooks ----------------------------------------------------------------------------------------

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def _trained_params(self) -> list[nn.Parameter]:
        return []

    def _extra_state(self) -> dict:
        return {}

    def _check_extra_state(self, state: dict) -> None:
        """ValueError when the subclass's metadata (from _extra_state) is malformed."""

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _identity(self) -> dict:
        """JSON-able settings a state must have been saved with to be loaded here."""
        return {"class": type(self).__name__}

    def _check_meta(self, meta: dict) -> None:
        what = type(self).__name__
        for key, value in self._identity().items():
            if meta[key] != value:
                raise ValueError(f"{what}: state {key} {meta[key]!r} differs from {value!r}")
        check_step_meta(what, meta)

    # Generic flow ---------------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {**self._identity(), "seed": self.seed, "step": self.step_count, "extra": self._extra_state(),
                "optimizers": {}}  # fmt: skip

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata): everything needed to resume learning exactly: the learner's tensors, its
        optimizers, the global RNG streams (the loss's noise and timesteps draw from them) and the trained
        weights (model.<i>, in _trained_params' order)."""
        tensors = {f"learner.{k}": v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}
        tensors.update({f"model.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self._trained_params())})
        tensors.update(rng_state_tensors())
        meta = self._meta()
        for prefix, optimizer in self._optimizers().items():
            optimizer_tensors, optimizer_meta = _flatten_optimizer(prefix, optimizer)
            tensors.update(optimizer_tensors)
            meta["optimizers"][prefix] = optimizer_meta
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict, restore_rng_state: bool = True) -> None:
        """Restore what state_dict() returned (and the global RNG streams, unless restore_rng_state=False).
        Everything is checked first: on ValueError (KeyError/TypeError for missing or mistyped metadata)
        the learner is unchanged."""
        what = type(self).__name__
        self._check_meta(meta)
        mine, _ = self.state_dict()
        optimizers = self._optimizers()
        own = ("learner.", "model.", "rng.")
        check_tensors(what, {k: v for k, v in mine.items() if k.startswith(own[:2])},
                      {k: v for k, v in tensors.items() if k.startswith(own[:2])})  # fmt: skip
        check_rng_tensors(what, tensors)
        stray = [k for k in tensors if not k.startswith(own) and k.split(".", 1)[0] not in optimizers]
        if stray:
            raise ValueError(f"{what}: state has unexpected tensors {stray[:3]}")
        optimizer_states = {}
        for prefix, optimizer in optimizers.items():
            if prefix not in meta["optimizers"]:
                raise ValueError(f"{what}: state has no {prefix} (saved with other learning rates?)")
            optimizer_states[prefix] = _unflatten_optimizer(prefix, tensors, meta["optimizers"][prefix])
            check_optimizer_state(what, optimizer, optimizer_states[prefix])
        self._check_extra_state(meta["extra"])
        self.seed, self.step_count = meta["seed"], meta["step"]
        self._load_state_tensors({k[len("learner.") :]: v for k, v in tensors.items() if k.startswith("learner.")})
        with torch.no_grad():
            for index, param in enumerate(self._trained_params()):
                param.copy_(tensors[f"model.{index}"])
        self._load_extra_state(meta["extra"])
        for prefix, optimizer in optimizers.items():
            optimizer.load_state_dict(optimizer_states[prefix])
        if restore_rng_state:
            restore_rng(tensors)

    def save(self, path: str | os.PathLike) -> None:
        """Write the learner's state to a safetensors file (metadata as JSON under "prunedm"), atomically."""
        save_state_file(path, *self.state_dict())

    def load(self, path: str | os.PathLike, restore_rng_state: bool = True) -> None:
        """Resume from a file written by save() for the same model and settings, continuing the global RNG
        streams where it stopped. ValueError naming the file if it cannot be used; then nothing changed."""
        tensors, meta = load_state_file(path)
        try:
            self.load_state_dict(tensors, meta, restore_rng_state)
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"{path}: malformed {type(self).__name__} state ({type(exc).__name__}: {exc})") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if torch.is_tensor(value):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in learner metadata")
