"""Run configuration for the `prunedm` commands: YAML file + `key=value` overrides, checked
against the command's defaults, and the run's output directory (resolved config, resume rules)."""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from prunedm._atomic import write_text_atomic  # noqa: F401  (re-exported: callers write through it)

_RATIO = re.compile(r"\d+:\d+")
# A config is a few dozen keys: these bounds are far above any real one and far below what hurts.
MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 10_000  # scalars, lists and mappings once aliases are expanded (a "billion laughs" file has 10^9)
MAX_DEPTH = 32
_FLOAT = "tag:yaml.org,2002:float"
# YAML 1.2 floats: PyYAML's YAML 1.1 rule needs a dot, so 1e-4 and 1E5 would stay text.
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class ConfigError(ValueError):
    """A config problem the user can fix; the message says what and how."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and a nesting-depth limit while composing."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConfigError(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes what _Loader would read as a number (the text "1e5") and writes shared
    values out in full, so config.yaml reads back equal."""

    yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers

    def ignore_aliases(self, data) -> bool:
        return True


def _expanded_size(node, sizes: dict, open_nodes: set) -> int:
    """Nodes in `node` with every alias expanded, computed once per shared node; cycles are refused."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError("an alias refers to a node that contains it (a recursive structure)")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_NODES:
            break  # already too big: no need to count the rest (which may be astronomically large)
    open_nodes.discard(key)
    sizes[key] = size
    return size


def safe_load(text: str) -> Any:
    """YAML text -> Python values, refusing what a config never needs: more than MAX_NODES values once
    anchors/aliases are expanded, nesting deeper than MAX_DEPTH. Raises ConfigError or yaml.YAMLError."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_NODES:
            raise ConfigError(f"more than {MAX_NODES} values once anchors and aliases (*name) are expanded")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _merge(base: dict, update: dict, where: str) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            hint = difflib.get_close_matches(str(key), [str(k) for k in base], n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(map(str, base))}"
            raise ConfigError(f"unknown config key {path!r}{suggestion}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {_short(value)}")
            merged[key] = _merge(base[key], value, f"{path}.")
        elif isinstance(value, dict) and value:
            raise ConfigError(f"unknown config key '{path}.{next(iter(value))}': {path!r} is a value, not a mapping")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _short(value: Any) -> str:
    """repr(value), cut to a readable length (a value may be a long list)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_override(text: str) -> dict:
    """'a.b=3' -> {'a': {'b': 3}}; the value is read as YAML (numbers as written, e.g. 1e-4, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. finetune.steps=100)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    if _RATIO.fullmatch(raw):  # YAML 1.1 reads 2:4 as the base-60 integer 124; an N:M pattern is meant
        value = raw
    else:
        try:
            value = safe_load(raw) if raw else ""
        except ConfigError as exc:
            raise ConfigError(f"override {_short(text)}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {_short(text)}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    if problem is None:  # e.g. a ReaderError (a control character) has no problem/mark pair
        return " ".join(str(exc).split())[:200]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping a --config YAML file holds; one ConfigError naming the file for anything else."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a directory, expected a YAML file")
    if not path.exists():
        raise ConfigError(f"--config {path}: no such file")
    if not path.is_file():  # a device or pipe: reading could block or never end
        raise ConfigError(f"--config {path}: not a regular file, expected a YAML file")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config {path}: {size} bytes; a config file may have at most {MAX_CONFIG_BYTES}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a text file (expected UTF-8 YAML)") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        loaded = safe_load(text)
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({_yaml_problem(exc)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(defaults: dict, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """defaults <- YAML file <- overrides; unknown keys are errors."""
    config = copy.deepcopy(defaults)
    if path is not None:
        config = _merge(config, read_config_file(path), "")
    for text in overrides:
        config = _merge(config, parse_override(text), "")
    return config


def merge_config(defaults: dict, update: dict) -> dict:
    """defaults <- update (a nested dict, as a YAML file would give); unknown keys are errors."""
    return _merge(defaults, update, "")


RESOLVED = "config.yaml"


def prepare_out_dir(out: str | os.PathLike, config: dict, resume: bool) -> Path:
    """Create --out and write the resolved config; refuse to mix two different runs in one dir."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a directory (new or holding a run)")
    resolved = out / RESOLVED
    if resolved.exists():
        if not resume:
            raise ConfigError(f"--out {out} already holds a run: pass --resume to continue it, or choose another --out")
        previous = read_resolved(out)
        if previous != config:
            changed = sorted(_diff_keys(previous, config))
            raise ConfigError(f"--resume: the config differs from the run in {out} at {', '.join(changed)}")
    elif out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"--out {out} exists and is not empty: choose another --out")
    write_text_atomic(resolved, yaml.dump(config, Dumper=_Dumper, sort_keys=False))
    return out


def read_resolved(out: str | os.PathLike) -> dict:
    """The resolved config a run wrote to out/config.yaml (ConfigError if it is not one)."""
    resolved = Path(out) / RESOLVED
    try:
        previous = safe_load(resolved.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"--resume: {resolved} is not a readable run config ({type(exc).__name__})") from None
    if not isinstance(previous, dict):
        raise ConfigError(f"--resume: {resolved} is not a run config (expected a mapping)")
    return previous


def _diff_keys(a: Any, b: Any, where: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return set().union(*(_diff_keys(a.get(k), b.get(k), f"{where}{k}.") for k in keys)) if keys else set()
    return set() if a == b else {where.rstrip(".")}


def dumps(config: dict) -> str:
    """The config as indented JSON, for the log."""
    return json.dumps(config, indent=1, default=str)
