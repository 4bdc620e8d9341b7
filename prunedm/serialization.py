"""Save and load pruned diffusers models without pickle: safetensors weights plus a JSON description of
the structure (class, config, every module's attributes and tensor shapes) to rebuild them exactly.

    save_pretrained(model, "out/pruned")      # out/pruned/{structure.json, model.safetensors}
    model = load_pretrained("out/pruned")     # build from config, resize to the saved shapes, load strictly

Modules that are not plain resized torch/diffusers layers (e.g. 2:4 sparse layers) describe and
rebuild themselves through `STRUCTURE_HOOKS`: {class name: (describe, rebuild)}, where
`describe(module) -> dict` (JSON) is stored with the module and `rebuild(description, module)`
returns the module to put in its place, given the one the config built there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "prunedm-structure"
FORMAT_VERSION = 1
# Non-persistent buffers (not in state_dict) are saved too, under this prefix.
BUFFER_PREFIX = "__buffer__."

Describe = Callable[[nn.Module], dict]
Rebuild = Callable[[dict, nn.Module], nn.Module]
STRUCTURE_HOOKS: dict[str, tuple[Describe, Rebuild]] = {}


def register_structure_hook(class_name: str, describe: Describe, rebuild: Rebuild) -> None:
    """Let modules of class `class_name` save extra structure and be rebuilt from it on load."""
    STRUCTURE_HOOKS[class_name] = (describe, rebuild)


def describe_structure(model: nn.Module, structure_hooks: Mapping | None = None) -> dict:
    """The JSON-able description save_pretrained writes: class, config, and per-module structure."""
    hooks = {**STRUCTURE_HOOKS, **(structure_hooks or {})}
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "from_config"):
        raise TypeError(f"{type(model).__name__} has no diffusers config: save_pretrained needs a ConfigMixin model")
    modules = {}
    for name, module in model.named_modules():
        entry = {
            "class": type(module).__name__,
            "attributes": _simple_attributes(module),
            "parameters": {k: None if p is None else list(p.shape) for k, p in module._parameters.items()},
            "buffers": {k: None if b is None else list(b.shape) for k, b in module._buffers.items()},
        }
        if type(module).__name__ in hooks:
            entry["extra"] = hooks[type(module).__name__][0](module)
        modules[name] = entry
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "class": type(model).__name__,
        "config": {k: _config_value(k, v) for k, v in dict(config).items() if not k.startswith("_")},
        "modules": modules,
    }


def _config_value(key: str, value):
    try:
        return _to_json(value)
    except TypeError as error:
        raise TypeError(f"config field {key!r} cannot be saved as JSON: {error}") from error


def save_pretrained(model: nn.Module, path: str | os.PathLike, structure_hooks: Mapping | None = None) -> Path:
    """Write path/structure.json and path/model.safetensors; each file appears whole or not at all.

    A new directory is written under a temporary name and renamed into place. Over an existing one,
    the weights are replaced first and the structure last; the structure records the weights' sha256,
    so a reader never silently pairs a structure with other weights."""
    path = Path(path)
    structure = describe_structure(model, structure_hooks)
    tensors = _tensors_to_save(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            os.chmod(tmp_dir, 0o777 & ~_umask())
            _write_files(tmp_dir, structure, tensors)
            os.replace(tmp_dir, path)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    else:
        _write_files(path, structure, tensors)
    return path


def load_pretrained(
    path: str | os.PathLike,
    model_classes: Mapping[str, type] | None = None,
    structure_hooks: Mapping | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model saved by save_pretrained, in eval mode, with exactly its weights.

    The class is looked up in `model_classes`, then in diffusers (no code is imported from the file).
    Raises ValueError naming the file when a file is corrupt or does not match the other."""
    path = Path(path)
    structure_path, weights_path = path / STRUCTURE_FILE, path / WEIGHTS_FILE
    for file in (structure_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: not a directory written by prunedm.save_pretrained")
    structure = _read_structure(structure_path)
    digest = _sha256(weights_path)
    if digest != structure["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match {structure_path}: sha256 {digest[:12]}... but the structure was "
            f"saved with {structure['weights_sha256'][:12]}... (a partial copy, or files from two saves)"
        )
    try:
        tensors = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error

    cls = _resolve_class(structure["class"], model_classes, structure_path)
    try:
        with torch.device("meta"):
            model = cls.from_config(structure["config"])
    except Exception as error:
        raise ValueError(
            f"{structure_path}: {structure['class']}.from_config failed on the saved config: {error}"
        ) from error
    _apply_structure(model, structure, {**STRUCTURE_HOOKS, **(structure_hooks or {})}, structure_path)

    buffers = {k[len(BUFFER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(BUFFER_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(BUFFER_PREFIX)}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{weights_path} does not fit the structure in {structure_path}: {error}") from error
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        module = dict(model.named_modules()).get(owner)
        if module is None or attr not in module._buffers:
            raise ValueError(f"{weights_path} holds buffer {name!r}, which the structure in {structure_path} lacks")
        module._buffers[attr] = value
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{weights_path} lacks tensors the structure needs: {leftover[:5]}")
    return model.to(device).eval()


# ---- saving ----


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    tensors = {}
    seen = set()
    persistent = set(state)
    for name, value in list(state.items()) + [
        (BUFFER_PREFIX + n, b) for n, b in model.named_buffers() if n not in persistent
    ]:
        value = value.detach().cpu().contiguous()
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key in seen or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()  # safetensors refuses tensors that share or partly view storage
        seen.add((value.untyped_storage().data_ptr(), value.storage_offset()))
        tensors[name] = value
    return tensors


def _write_files(directory: Path, structure: dict, tensors: dict[str, torch.Tensor]) -> None:
    weights = directory / WEIGHTS_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "saved_by": FORMAT})
        os.chmod(tmp, 0o666 & ~_umask())
        digest = _sha256(Path(tmp))
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    text = json.dumps({**structure, "weights_file": WEIGHTS_FILE, "weights_sha256": digest}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{STRUCTURE_FILE}.")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / STRUCTURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _simple_attributes(module: nn.Module) -> dict:
    """Instance attributes holding plain values (ints, floats, strings, tuples of them): the widths,
    head counts and flags diffusers modules keep beside their layers."""
    skip = {"training"} | set(module._modules) | set(module._parameters) | set(module._buffers)
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in skip:
            continue
        try:
            out[key] = _to_json(value)
        except TypeError:
            continue
    return out


def _to_json(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- loading ----


def _read_structure(file: Path) -> dict:
    try:
        structure = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON (corrupt or truncated): {error}") from error
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise ValueError(f'{file} is not a prunedm structure file (no "format": "{FORMAT}")')
    if structure.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file} has format version {structure['version']}; this prunedm reads up to {FORMAT_VERSION}")
    missing = [k for k in ("class", "config", "modules", "weights_sha256") if k not in structure]
    if missing:
        raise ValueError(f"{file} lacks the fields {missing}")
    return structure


def _resolve_class(name: str, model_classes: Mapping | None, file: Path) -> type:
    if model_classes and name in model_classes:
        return model_classes[name]
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise ValueError(f"{file} names model class {name!r}, which is not a diffusers model; pass model_classes=")
    return cls


def _apply_structure(model: nn.Module, structure: dict, hooks: Mapping, file: Path) -> None:
    """Make the freshly built model's modules match the saved ones: classes, attributes, shapes."""
    saved = structure["modules"]
    # Hooks may replace a module with one of another class (and so other children): apply them first.
    for name in sorted((n for n, e in saved.items() if e["class"] in hooks), key=lambda n: n.count(".")):
        if name not in dict(model.named_modules()):
            continue
        replacement = hooks[saved[name]["class"]][1](saved[name].get("extra", {}), model.get_submodule(name))
        if name:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, replacement)
    built = dict(model.named_modules())
    missing, extra = sorted(set(saved) - set(built)), sorted(set(built) - set(saved))
    if missing or extra:
        raise ValueError(
            f"{file}: a {structure['class']} built from the saved config has other modules than the saved one "
            f"(missing {missing[:5]}, unexpected {extra[:5]}); was it saved by another version?"
        )
    for name, entry in saved.items():
        module = built[name]
        if type(module).__name__ != entry["class"]:
            raise ValueError(
                f"{file}: module {name!r} is a {entry['class']} but the config builds a {type(module).__name__}"
            )
        for key, value in entry["attributes"].items():
            current = getattr(module, key, None)
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            if current != value:
                object.__setattr__(module, key, value)
        for slots, entries in ((module._parameters, entry["parameters"]), (module._buffers, entry["buffers"])):
            for key, shape in entries.items():
                current = slots.get(key)
                if shape is None:
                    slots[key] = None
                elif current is None or list(current.shape) != shape:
                    tensor = torch.empty(shape, device="meta")
                    slots[key] = nn.Parameter(tensor) if slots is module._parameters else tensor
