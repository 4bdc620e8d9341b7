"""Step 4 of gpu-check.sh: a few small calls of every own kernel, run under compute-sanitizer memcheck,
racecheck and initcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each buffer is its own allocation)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from prunedm import ops  # noqa: E402
from prunedm._atomic import write_text_atomic  # noqa: E402
from prunedm.ops import reference  # noqa: E402


def calls(device: torch.device) -> list[tuple[str, object]]:
    """(name, thunk) per kernel; shapes are odd where the op allows it, so tails and guards run."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    w = torch.randn(33, 20, generator=g).to(device=device, dtype=dtype)
    dense = torch.randn(64, 96, generator=g)
    dense = (dense * reference.nm_mask_ref(dense)).to(device=device, dtype=torch.float16)
    values, meta = ops.compress_2to4(dense, backend="reference")
    x = torch.randn(7, 96, generator=g).to(device=device, dtype=dtype)
    lin_values, bias = values.to(dtype), torch.randn(64, generator=g).to(device=device, dtype=dtype)
    res = torch.randn(7, 64, generator=g).to(device=device, dtype=dtype)
    conv_dense = torch.randn(32, 288, generator=g)
    conv_dense = (conv_dense * reference.nm_mask_ref(conv_dense)).to(device=device, dtype=dtype)
    cv, cm = ops.compress_2to4(conv_dense.half(), backend="reference")
    cv = cv.to(dtype)
    img = torch.randn(2, 32, 5, 7, generator=g).to(device=device, dtype=dtype)
    logits = torch.randn(5, 12, generator=g).to(device=device, dtype=dtype)
    plogits = torch.randn(5, 3, 6, generator=g).to(device=device, dtype=dtype)
    found = []
    for backend in ("extension", "triton"):
        found += [
            (f"nm_mask[{backend}]", lambda b=backend: ops.nm_mask(w, backend=b)),
            (f"nm_violations[{backend}]", lambda b=backend: ops.nm_violations(w, backend=b)),
            (f"compress_2to4[{backend}]", lambda b=backend: ops.compress_2to4(dense, backend=b)),
            (f"decompress_2to4[{backend}]", lambda b=backend: ops.decompress_2to4(values, meta, backend=b)),
            (f"gumbel_nm_sample[{backend}]", lambda b=backend: ops.gumbel_nm_sample(logits, 2, 4, 0.5, False, 1,
                                                                                    backend=b)),  # fmt: skip
            (f"gumbel_pattern_sample[{backend}]", lambda b=backend: ops.gumbel_pattern_sample(plogits, 2, 4, 0.5,
                                                                                              True, 1, backend=b)),
        ]  # fmt: skip
    for backend in ("extension", "nvrtc"):
        found += [
            (f"sparse_linear_2to4[{backend}]", lambda b=backend: ops.sparse_linear_2to4(
                x, lin_values, meta, bias, activation="gelu", residual=res, backend=b)),
            (f"sparse_conv2d_2to4[{backend}]", lambda b=backend: ops.sparse_conv2d_2to4(
                img, cv, cm, (32, 32, 3, 3), None, padding=1, activation="silu", backend=b)),
            (f"sparse_conv2d_2to4 nhwc[{backend}]", lambda b=backend: ops.sparse_conv2d_2to4(
                img.to(memory_format=torch.channels_last), cv, cm, (32, 32, 3, 3), None, stride=2, padding=1,
                backend=b)),
        ]  # fmt: skip
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory for calls.txt (what ran, what could not)")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors: the calls' logic without a GPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    lines, failed = [], 0
    for name, thunk in calls(device):
        t0 = time.perf_counter()
        try:
            thunk()
            if device.type == "cuda":
                torch.cuda.synchronize()
            lines.append(f"{name}\tran\t{time.perf_counter() - t0:.3f}s")
        except Exception as exc:  # not available here (a skip) or a real error: the sanitizer log tells which
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            skipped = any(w in text for w in ("cannot run here", "not available", "no CUDA device"))
            failed += not skipped
            lines.append(f"{name}\t{'skipped' if skipped else 'ERROR'}\t{text}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # One file per sanitizer tool run would clash; the last run's list is what the summary needs.
    write_text_atomic(Path(args.out) / "calls.txt", "\n".join(lines) + "\n")
    print("\n".join(line[:160] for line in lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
