"""Run configuration for the `prunedm` commands: YAML file + `key=value` overrides, checked
against the command's defaults, and the run's output directory (resolved config, resume rules)."""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

_RATIO = re.compile(r"\d+:\d+")


class ConfigError(ValueError):
    """A config problem the user can fix; the message says what and how."""


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
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            merged[key] = _merge(base[key], value, f"{path}.")
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """'a.b=3' -> {'a': {'b': 3}}; the value is read as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. finetune.steps=100)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    if _RATIO.fullmatch(raw):  # YAML 1.1 reads 2:4 as the base-60 integer 124; an N:M pattern is meant
        value = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(defaults: dict, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> dict:
    """defaults <- YAML file <- overrides; unknown keys are errors."""
    config = copy.deepcopy(defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        config = _merge(config, loaded, "")
    for text in overrides:
        config = _merge(config, parse_override(text), "")
    return config


def merge_config(defaults: dict, update: dict) -> dict:
    """defaults <- update (a nested dict, as a YAML file would give); unknown keys are errors."""
    return _merge(defaults, update, "")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


RESOLVED = "config.yaml"


def prepare_out_dir(out: str | os.PathLike, config: dict, resume: bool) -> Path:
    """Create --out and write the resolved config; refuse to mix two different runs in one dir."""
    out = Path(out)
    resolved = out / RESOLVED
    if resolved.exists():
        previous = yaml.safe_load(resolved.read_text())
        if not resume:
            raise ConfigError(f"--out {out} already holds a run: pass --resume to continue it, or choose another --out")
        if previous != config:
            changed = sorted(_diff_keys(previous or {}, config))
            raise ConfigError(f"--resume: the config differs from the run in {out} at {', '.join(changed)}")
    elif out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"--out {out} exists and is not empty: choose another --out")
    write_text_atomic(resolved, yaml.safe_dump(config, sort_keys=False))
    return out


def _diff_keys(a: Any, b: Any, where: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return set().union(*(_diff_keys(a.get(k), b.get(k), f"{where}{k}.") for k in keys)) if keys else set()
    return set() if a == b else {where.rstrip(".")}


def dumps(config: dict) -> str:
    """The config as indented JSON, for the log."""
    return json.dumps(config, indent=1, default=str)
