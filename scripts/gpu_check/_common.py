"""What the Python steps of scripts/gpu-check.sh share: their arguments, the device, a deadline, JSON output.
Each step runs in its own process; --dry-run makes it take the CPU and tiny shapes so CI can exercise it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

# The carried tree runs in place: the repository root must be importable (prunedm, bench).
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The CPU stands in for the GPU on a dry run: Triton kernels then run in its interpreter, which must be
# switched on before triton is first imported.
if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def _load_atomic():
    """prunedm/_atomic.py by path: `import prunedm` needs diffusers and torch-pruning, which the GPU image gets
    only in the setup step, after the env step has run."""
    spec = importlib.util.spec_from_file_location("_prunedm_atomic", ROOT / "prunedm" / "_atomic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_text_atomic = _load_atomic().write_text_atomic


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """--out DIR (the step's JSON), --work DIR (bulky files), --seconds S (this step's share), --dry-run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="directory for the step's result JSON")
    parser.add_argument("--work", default=None, help="directory for logs and bulky files (default: --out)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time this step may take")
    parser.add_argument("--dry-run", action="store_true", help="CPU and tiny shapes: exercise the logic, no GPU")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if not args.seconds > 0 or not math.isfinite(args.seconds):
        parser.error(f"--seconds must be a positive number, got {args.seconds}")
    args.out = Path(args.out)
    args.work = Path(args.work) if args.work else args.out
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.deadline = time.monotonic() + args.seconds
    if args.dry_run:  # tiny shapes: more threads only add start-up and oversubscription on a shared CPU
        torch.set_num_threads(1)
    return args


def device_for(args) -> torch.device:
    """cuda on a real run (an error when none is visible: a GPU run without one measures nothing), cpu on a dry run."""
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible (use --dry-run on a CPU machine)")
    return torch.device("cuda")


class Deadline:
    """Time left of a step's share, keeping a margin for writing results."""

    def __init__(self, deadline: float, margin_s: float = 2.0):
        self.deadline, self.margin_s = deadline, margin_s

    def left(self) -> float:
        return self.deadline - self.margin_s - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def write_json(path: Path, data) -> None:
    """Whole or not at all: a step killed by its timeout leaves the previous version, never half a file."""
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Fill the caching allocator's free memory with 0xFF bytes (NaN in float16/bfloat16/float32, -1 in ints)
    so the next allocations of about nbytes come back poisoned: an output element a kernel never writes then
    shows as NaN instead of a plausible zero. A no-op on CPU (no caching allocator to poison)."""
    if device.type != "cuda":
        return
    # A few blocks of the sizes the next call will ask for, freed at once: the allocator hands them out again.
    blocks = [torch.empty(max(nbytes, 512), dtype=torch.uint8, device=device).fill_(0xFF) for _ in range(4)]
    del blocks


def max_errors(got: torch.Tensor, expected: torch.Tensor) -> dict:
    """max |got - expected|, max error relative to the largest |expected|, and NaNs in got that expected lacks."""
    got64, exp64 = got.detach().double().cpu(), expected.detach().double().cpu()
    if got64.shape != exp64.shape:
        return {"max_abs_err": math.inf, "max_rel_err": math.inf, "nan_extra": 0, "shape_mismatch": True}
    extra_nan = int((got64.isnan() & ~exp64.isnan()).sum())
    both = ~(got64.isnan() | exp64.isnan())
    diff = (got64 - exp64).abs()[both]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(exp64[both].abs().max()) if both.any() else 0.0
    return {"max_abs_err": max_abs, "max_rel_err": max_abs / max(scale, 1e-30), "nan_extra": extra_nan}
