"""Save and load pruned diffusers models without pickle: safetensors weights plus a JSON description of
the structure (class, config, every module's attributes and tensor shapes) to rebuild them exactly.

    save_pretrained(model, "out/pruned")      # out/pruned/{structure.json, model.safetensors}
    model = load_pretrained("out/pruned")     # build from config, resize to the saved shapes, load strictly

Modules that are not plain resized torch/diffusers layers (e.g. 2:4 sparse layers) describe and
rebuild themselves through `STRUCTURE_HOOKS`: {class name: (describe, rebuild)}, where
`describe(module) -> dict` (JSON) is stored with the module and `rebuild(description, module)`
returns the module to put in its place, given the one the config built there."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunedm._atomic import atomic_dir, atomic_file, is_temp, write_text_atomic
from prunedm._integrity import file_sha256
from prunedm._optional import optional_import

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "prunedm-structure"
FORMAT_VERSION = 1
# Non-persistent buffers (not in state_dict) are saved too, under this prefix.
BUFFER_PREFIX = "__buffer__."
# Bounds on what a file may claim, checked before anything is allocated or built (a few edited bytes
# must not take minutes or gigabytes): layer/block counts, other config integers, list lengths.
MAX_DEPTH = 128
MAX_LAYERS = 512
MAX_CONFIG_INT = 1 << 20
MAX_LIST_ITEMS = 64
MAX_MODULES = 200_000
MAX_STRUCTURE_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

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
    """Write path/structure.json and path/model.safetensors, the directory whole or not at all.

    The new save is written beside `path` and swapped into place when complete (prunedm._atomic.atomic_dir):
    over an existing save, the old one stays loadable until then; other files in it are carried over."""
    path = Path(path)
    structure = describe_structure(model, structure_hooks)
    tensors = _tensors_to_save(model)
    with atomic_dir(path) as tmp_dir:
        _write_files(tmp_dir, structure, tensors)
        if path.is_dir():
            _carry_over(path, tmp_dir)
    return path


def _carry_over(old: Path, new: Path) -> None:
    # Files a user keeps beside a save (a README, samples) survive an overwrite of the save.
    for entry in old.iterdir():
        if entry.name in (STRUCTURE_FILE, WEIGHTS_FILE) or is_temp(entry) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


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
    cls = _resolve_class(structure["class"], model_classes, structure_path)
    # A dict only (from_config would fetch a string from the hub), its sizes bounded before building.
    check_config(structure["config"], structure_path, "config")
    digest = file_sha256(weights_path)
    if digest != structure["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match {structure_path}: sha256 {digest[:12]}... but the structure was "
            f"saved with {structure['weights_sha256'][:12]}... (a partial copy, or files from two saves)"
        )
    # Every size the structure claims must be a tensor the weights file holds, before anything is built
    # (both files may be forged together: the checksum then matches).
    _check_claimed_shapes(structure, read_safetensors_header(weights_path), structure_path, weights_path)
    try:
        tensors = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error

    config = {k: v for k, v in structure["config"].items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
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
    with atomic_file(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "saved_by": FORMAT})
        digest = file_sha256(tmp)
    text = json.dumps({**structure, "weights_file": WEIGHTS_FILE, "weights_sha256": digest}, indent=1)
    write_text_atomic(directory / STRUCTURE_FILE, text + "\n")


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


# ---- loading ----


def _read_structure(file: Path) -> dict:
    if file.stat().st_size > MAX_STRUCTURE_BYTES:
        raise ValueError(f"{file} is {file.stat().st_size} bytes; a structure file is at most {MAX_STRUCTURE_BYTES}")
    try:
        structure = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{file} is not valid JSON (corrupt or truncated): {error}") from error
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise ValueError(f'{file} is not a prunedm structure file (no "format": "{FORMAT}")')
    version = structure.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{file} has format version {version!r}; this prunedm reads up to {FORMAT_VERSION}")
    missing = [k for k in ("class", "config", "modules", "weights_sha256") if k not in structure]
    if missing:
        raise ValueError(f"{file} lacks the fields {missing}")
    for key, kind in (("class", str), ("config", dict), ("modules", dict), ("weights_sha256", str)):
        if not isinstance(structure[key], kind):
            raise ValueError(f"{file}: field {key!r} must be {_JSON_NAMES[kind]}, got {_json_type(structure[key])}")
    if len(structure["modules"]) > MAX_MODULES:
        raise ValueError(f"{file}: field 'modules' lists {len(structure['modules'])} modules, at most {MAX_MODULES}")
    for name, entry in structure["modules"].items():
        _check_module_entry(name, entry, file)
    return structure


def _check_module_entry(name: str, entry, file: Path) -> None:
    where = f"{file}: modules[{name!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object, got {_json_type(entry)}")
    for key, kind in (("class", str), ("attributes", dict), ("parameters", dict), ("buffers", dict)):
        if not isinstance(entry.get(key), kind):
            raise ValueError(f"{where}: field {key!r} must be {_JSON_NAMES[kind]}, got {_json_type(entry.get(key))}")
    if "extra" in entry and not isinstance(entry["extra"], dict):
        raise ValueError(f"{where}: field 'extra' must be a JSON object, got {_json_type(entry['extra'])}")
    for key in entry["attributes"]:
        if key.startswith("_") or key == "training":
            raise ValueError(f"{where}: attribute {key!r} is not one save_pretrained writes")
    for group in ("parameters", "buffers"):
        for key, shape in entry[group].items():
            if shape is None:
                continue
            ok = isinstance(shape, list) and len(shape) <= 8
            if not (ok and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
                raise ValueError(f"{where}: {group}[{key!r}] must be a shape (a list of sizes >= 0), got {shape!r}")


def _check_claimed_shapes(structure: dict, header: dict, file: Path, weights: Path) -> None:
    for name, entry in structure["modules"].items():
        for group in ("parameters", "buffers"):
            for key, shape in entry[group].items():
                full = f"{name}.{key}" if name else key
                found = header.get(full) or header.get(BUFFER_PREFIX + full)
                if shape is not None and (found is None or found[1] != shape):
                    got = "no such tensor" if found is None else f"shape {found[1]}"
                    raise ValueError(
                        f"{weights} does not fit the structure in {file}: modules[{name!r}].{group}[{key!r}] "
                        f"({full}) claims shape {shape}, the weights hold {got}"
                    )


def read_safetensors_header(file: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, read and checked without loading any
    tensor: each tensor's bytes must lie in the file. ValueError naming the file when it is not one."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{file} is not a safetensors file (truncated, or its header length is invalid)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{file} is not a safetensors file: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file: its header is not a JSON object")
    data_bytes, out = size - 8 - length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= dim if isinstance(dim, int) and dim >= 0 else -(2**70)
            valid = isinstance(dtype, str) and 0 <= begin <= end <= data_bytes and numel >= 0
            valid = valid and (dtype not in _DTYPE_BYTES or numel * _DTYPE_BYTES[dtype] == end - begin)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"{file} is not a valid safetensors file: the header entry of {name!r} is inconsistent")
        out[name] = (dtype, shape)
    return out


def check_config(config, file: str | os.PathLike, field: str = "config") -> None:
    """ValueError naming `file` and the field unless `config` is a JSON object of model settings whose
    sizes are sane: numbers of layers/blocks at most MAX_DEPTH, other integers at most MAX_CONFIG_INT,
    lists at most MAX_LIST_ITEMS long. Run before any from_config: a few edited bytes must not build for minutes."""
    if not isinstance(config, dict):
        raise ValueError(f"{file}: {field} must be a JSON object of model settings, got {_json_type(config)}")
    layers, blocks = 0, 1
    for key, value in config.items():
        depth = not key.startswith("_") and any(word in key for word in ("layers", "blocks", "depth"))
        _check_config_value(value, f"{field}.{key}", file, MAX_DEPTH if depth else MAX_CONFIG_INT)
        numbers = value if isinstance(value, list) else [value]
        if depth:
            layers += sum(v for v in numbers if isinstance(v, int) and not isinstance(v, bool) and v > 0)
        elif key.endswith("_types") and isinstance(value, list):
            blocks = max(blocks, len(value))
    # Building takes time per layer: bound layers times blocks (an SDXL UNet has ~45, Flux 57).
    if layers * blocks > MAX_LAYERS:
        raise ValueError(
            f"{file}: {field} describes {layers} layers in each of {blocks} blocks, more than {MAX_LAYERS} in all"
        )


def _check_config_value(value, where: str, file, limit: int, nesting: int = 0) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int) and abs(value) > limit:
        raise ValueError(f"{file}: {where} = {value} is out of range (at most {limit})")
    if isinstance(value, float) and value != value:
        return
    if isinstance(value, str) and len(value) > 10_000:
        raise ValueError(f"{file}: {where} is a string of {len(value)} characters (at most 10000)")
    if isinstance(value, (list, dict)):
        if len(value) > MAX_LIST_ITEMS or nesting > 4:
            raise ValueError(f"{file}: {where} has {len(value)} items nested {nesting} deep (at most {MAX_LIST_ITEMS})")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_config_value(item, f"{where}[{key!r}]", file, limit, nesting + 1)


_JSON_NAMES = {str: "a string", dict: "a JSON object", list: "a JSON list"}


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "a JSON object", list: "a JSON list", tuple: "a JSON list", str: "a string"}
    names.update({int: "a number", float: "a number"})
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _resolve_class(name: str, model_classes: Mapping | None, file: Path) -> type:
    if model_classes and name in model_classes:
        return model_classes[name]
    diffusers = optional_import("diffusers", f"loading {file}")

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
        try:
            replacement = hooks[saved[name]["class"]][1](saved[name].get("extra", {}), model.get_submodule(name))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            kind = saved[name]["class"]
            raise ValueError(f"{file}: modules[{name!r}] ({kind}) cannot be rebuilt: {error}") from error
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
            if key in module._modules or key in module._parameters or key in module._buffers:
                raise ValueError(f"{file}: modules[{name!r}].attributes[{key!r}] would hide the module's {key!r}")
            if not _same_kind(current, value):
                raise ValueError(
                    f"{file}: modules[{name!r}].attributes[{key!r}] is {_json_type(value)}, "
                    f"but a {entry['class']} holds {_json_type(current)} there"
                )
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


def _same_kind(current, value) -> bool:
    """Whether a saved attribute value may replace the built one: None either side, or the same JSON kind."""
    if current is None or value is None:
        return True
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    kinds = ((int, float), (str,), (list, tuple), (Mapping, dict))
    return any(isinstance(current, kind) and isinstance(value, kind) for kind in kinds) or not isinstance(
        current, (int, float, str, list, tuple, Mapping)
    )
