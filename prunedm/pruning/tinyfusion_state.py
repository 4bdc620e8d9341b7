"""Checkpoints of a TinyFusion depth search: gate logits, their EMA, the LoRA deltas, the optimizer state, the
step and the losses so far, as prunedm.train.checkpoint's step directories (safetensors + state.json with each
file's sha256, written whole or not at all). The draws are keyed by (seed, step), so the step is the only
random state; the search state is whole on every rank, so one file set resumes on any number of ranks."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from prunedm.train import checkpoint as ckpt

SEARCH, OPTIMIZER = "search", "optimizer"


def search_tensors(logits: torch.Tensor, ema: torch.Tensor, lora: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The search's tensors by name: logits, ema, lora.<i>."""
    return {"logits": logits.detach(), "ema": ema, **{f"lora.{i}": p.detach() for i, p in enumerate(lora)}}


def save_search(root: Path, step: int, tensors: dict, optimizer, losses: list[float], identity: dict) -> Path:
    """Write root/step-XXXXXXXX/ (the newest two kept) and point root/latest at it."""
    opt_tensors, opt_rest = ckpt.optimizer_to_tensors(optimizer)
    state = {"identity": identity, "losses": losses, "optimizer": opt_rest}
    return ckpt.save_checkpoint(Path(root), step, {SEARCH: tensors, OPTIMIZER: opt_tensors}, state, keep=2)


def _check(path: Path, loaded: dict, state: dict, tensors: dict, optimizer, identity: dict) -> dict:
    """The optimizer state dict of a loaded checkpoint, after checking that it belongs to this search."""
    saved = state.get("identity")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path}: not a depth-search checkpoint (no identity in state.json)")
    for key, value in identity.items():
        if saved.get(key) != value:
            raise ValueError(f"checkpoint {path}: saved with {key}={saved.get(key)!r}, this search has {value!r}")
    if not isinstance(state.get("losses"), list) or len(state["losses"]) != state.get("step"):
        raise ValueError(f"checkpoint {path}: its losses do not cover its {state.get('step')!r} steps")
    ckpt.check_tensors(f"checkpoint {path}", {k: v.detach() for k, v in tensors.items()}, loaded[SEARCH])
    opt_state = ckpt.optimizer_state_from_tensors(loaded[OPTIMIZER], state["optimizer"])
    ckpt.check_optimizer_state(f"checkpoint {path}", optimizer, opt_state)
    return opt_state


def load_search(root: Path, tensors: dict, optimizer, identity: dict) -> tuple[int, list[float]] | None:
    """Resume from the newest usable checkpoint under root: copies its tensors into `tensors` (in place) and its
    state into `optimizer`; returns (step, losses), or None when root holds no checkpoint. A newer checkpoint
    that cannot be used is skipped with a warning (the older one still resumes exactly); ValueError naming
    the first problem when none can be used."""
    root = Path(root)
    problems = []
    for path in ckpt.checkpoints_newest_first(root):
        try:
            loaded, state = ckpt.load_checkpoint(path, [SEARCH, OPTIMIZER])
            opt_state = _check(path, loaded, state, tensors, optimizer, identity)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(str(exc) if isinstance(exc, ValueError) else f"checkpoint {path}: malformed ({exc!r})")
            continue
        if problems:
            warnings.warn(f"resuming the depth search from {path.name}: {'; '.join(problems)}", stacklevel=3)
        with torch.no_grad():
            for key, value in tensors.items():
                value.copy_(loaded[SEARCH][key])
        optimizer.load_state_dict(opt_state)
        return state["step"], [float(x) for x in state["losses"]]
    if problems:
        raise ValueError(f"cannot resume the depth search: {problems[0]}; delete {root} to search afresh")
    return None
