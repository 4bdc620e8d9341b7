"""diffusers' own save_pretrained refuses, at save time, a model that its from_pretrained would rebuild wrong.

Sparse layers (packed buffers diffusers drops) and models whose config does not describe their shapes (pruned)
are refused with the fix named; prunedm.save_pretrained / load_pretrained round-trip them exactly."""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings

import torch
from torch import nn

FIX = "save it with prunedm.save_pretrained(model, dir) and load it with prunedm.load_pretrained(dir)"
# A module class that diffusers cannot save sets this class attribute to the reason (e.g. the sparse layers).
UNSAVEABLE_ATTR = "_diffusers_unsaveable"
_GUARDS_ATTR = "_prunedm_diffusers_save_guards"  # {reason: fix}, in the model's __dict__ (deepcopy keeps it)
_WRAPPED_MARK = "_prunedm_save_guard"


class DiffusersSaveError(ValueError):
    """diffusers' save_pretrained was refused: from_pretrained would not rebuild this model (nothing was written)."""


def guard_diffusers_save(model: nn.Module, reason: str, fix: str = FIX) -> nn.Module:
    """Make diffusers' save_pretrained of `model` (and of any pipeline holding it) raise DiffusersSaveError
    naming `reason` and `fix`, before anything is written. Returns `model`.

    For transformations diffusers' from_pretrained cannot undo. Kept by copy.deepcopy; a torch.compile'd
    wrapper is guarded through the model it wraps. Sparse layers and shape/config mismatches are refused
    without a guard (they are detected from the model itself, so a reloaded model is refused too)."""
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"guard_diffusers_save: reason must be a non-empty string, got {reason!r}")
    target = _unwrap(model)
    target.__dict__.setdefault(_GUARDS_ATTR, {})[reason] = fix
    install_save_guard()
    return model


def diffusers_save_problem(model: nn.Module) -> tuple[str, str] | None:
    """(reason, fix) when diffusers' from_pretrained would not rebuild `model` from its save_pretrained, else None."""
    model = _unwrap(model)
    guards = model.__dict__.get(_GUARDS_ATTR) or {}
    if guards:
        return next(iter(guards.items()))
    unsaveable: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        reason = getattr(type(module), UNSAVEABLE_ATTR, None)
        if reason:
            unsaveable.setdefault(reason, []).append(name or "(the model itself)")
    if unsaveable:
        reason, names = next(iter(unsaveable.items()))
        return f"{len(names)} layer(s) are {reason} (e.g. {names[0]!r})", FIX
    problem = _config_problem(model)
    return None if problem is None else (problem, FIX)


def check_diffusers_save(obj, where: str = "") -> None:
    """Raise DiffusersSaveError when `obj` (a diffusers model, or a pipeline through its components) must not be
    saved by diffusers; `where` names the call in the message."""
    where = where or f"{type(obj).__name__}.save_pretrained"
    components = getattr(obj, "components", None)
    if isinstance(obj, nn.Module) or not isinstance(components, dict):
        parts = {"": obj}
    else:
        parts = {name: part for name, part in components.items() if isinstance(_unwrap(part), nn.Module)}
    for name, part in parts.items():
        problem = diffusers_save_problem(part)
        if problem is None:
            continue
        reason, fix = problem
        if name:
            reason = f"component {name!r} ({type(_unwrap(part)).__name__}): {reason}"
            fix = (
                f"{fix.replace('(model,', f'(pipe.{name},')}, then pass it to {type(obj).__name__}({name}=...); "
                "or save the pipeline before sparsifying or pruning it"
            )
        raise DiffusersSaveError(
            f"{where} refused: diffusers' from_pretrained would not rebuild this model: {reason}; {fix} "
            "(nothing was written)"
        )


def install_save_guard() -> bool:
    """Wrap diffusers' ModelMixin.save_pretrained and DiffusionPipeline.save_pretrained (once per process) so that
    they call check_diffusers_save first. False when diffusers is not installed."""
    try:
        from diffusers import DiffusionPipeline, ModelMixin
    except ImportError:
        return False
    for cls in (ModelMixin, DiffusionPipeline):
        original = cls.__dict__.get("save_pretrained")
        if original is None or getattr(original, _WRAPPED_MARK, False):
            continue
        cls.save_pretrained = _guarded(original)
    return True


def install_save_guard_if_loaded() -> None:
    """install_save_guard() when diffusers is already imported (a diffusers model can exist), at no import cost."""
    if "diffusers" in sys.modules and not _installed():
        install_save_guard()


def _installed() -> bool:
    mixin = getattr(sys.modules.get("diffusers.models.modeling_utils"), "ModelMixin", None)
    return mixin is not None and getattr(mixin.__dict__.get("save_pretrained"), _WRAPPED_MARK, False)


def _guarded(save_pretrained):
    @functools.wraps(save_pretrained)  # keeps the signature: pipelines read its parameters
    def guarded_save_pretrained(self, save_directory, *args, **kwargs):
        check_diffusers_save(self, f"{type(self).__name__}.save_pretrained({str(save_directory)!r})")
        return save_pretrained(self, save_directory, *args, **kwargs)

    setattr(guarded_save_pretrained, _WRAPPED_MARK, True)
    return guarded_save_pretrained


def _unwrap(module):
    # torch.compile's OptimizedModule (and wrappers of it) hold the real model in _orig_mod.
    while isinstance(getattr(module, "__dict__", {}).get("_modules", {}).get("_orig_mod"), nn.Module):
        module = module._orig_mod
    return module


def _config_problem(model: nn.Module) -> str | None:
    """Why a model built from model.config would not take model's weights (missing tensors, other shapes), or None.

    Extra tensors alone are not refused: diffusers drops them with a warning, and fused projections are one."""
    cls, config = type(model), getattr(model, "config", None)
    if config is None or not hasattr(cls, "from_config") or not hasattr(cls, "save_config"):
        return None
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "_hf_peft_config_loaded", False):
        return None  # diffusers saves quantized and adapter weights in its own way
    fresh = _build_on_meta(cls, config)
    if fresh is None:
        return None
    expected = {k: list(v.shape) for k, v in fresh.state_dict().items()}
    actual = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in actual]
    if missing:
        return (
            f"{len(missing)} tensor(s) of a {cls.__name__} built from its config are not in the model "
            f"(e.g. {missing[0]!r}): from_pretrained would leave them randomly initialised"
        )
    for key, shape in expected.items():
        if actual[key] != shape:
            return (
                f"its config does not describe its shapes ({key!r} is {actual[key]} here, {shape} in a "
                f"{cls.__name__} built from its config, as after channel pruning): from_pretrained would fail"
            )
    return None


def _build_on_meta(cls, config):
    """The model the config describes, weightless, or None when it cannot be built (then nothing is refused)."""
    quiet = contextlib.nullcontext()
    logging = getattr(sys.modules.get("diffusers.utils"), "logging", None)
    if logging is not None:
        verbosity = logging.get_verbosity()
        quiet = _restoring(lambda: logging.set_verbosity(verbosity))
        logging.set_verbosity_error()
    with quiet, warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            return cls.from_config(dict(config))
        except Exception:  # noqa: BLE001 - a config that does not build is diffusers' own loud error on load
            return None


@contextlib.contextmanager
def _restoring(restore):
    try:
        yield
    finally:
        restore()
