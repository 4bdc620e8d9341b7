"""Step 6 of gpu-check.sh: DiT-XL/2 and the SD-1.5 UNet, masked dense against sparsify(backend torch / prunedm /
auto): one denoising step's error against the masked dense model, its time, and which path each layer ran."""

from __future__ import annotations

import collections
import copy
import time

import torch
import torch.nn as nn
from _common import Deadline, device_for, max_errors, parse_args, synchronize, write_json

from prunedm import ops
from prunedm.architectures import build
from prunedm.measure import time_ms
from prunedm.nn import sparsify
from prunedm.nn.sparsify import ineligible_reason

BACKENDS = ("torch", "prunedm", "auto")
# name -> (batch, input builder); the dry run's stand-ins are the small members of the same families.
MODELS = {
    "dit-xl-2": (2, lambda b, d, t: {"hidden_states": torch.randn(b, 4, 32, 32).to(d, t),
                                    "timestep": torch.full((b,), 500, device=d),
                                    "class_labels": torch.arange(b, device=d)}),
    "sd15-unet": (2, lambda b, d, t: {"sample": torch.randn(b, 4, 64, 64).to(d, t),
                                     "timestep": torch.full((b,), 500, device=d),
                                     "encoder_hidden_states": torch.randn(b, 77, 768).to(d, t)}),
}  # fmt: skip
DRY_MODELS = {
    "dit-s-2": (1, lambda b, d, t: {"hidden_states": torch.randn(b, 4, 8, 8).to(d, t),
                                   "timestep": torch.full((b,), 500, device=d),
                                   "class_labels": torch.arange(b, device=d)}),
    "tiny-unet": (1, lambda b, d, t: {"sample": torch.randn(b, 1, 16, 16).to(d, t),
                                     "timestep": torch.full((b,), 500, device=d)}),
}  # fmt: skip
# The sparse model's output may differ from the masked dense one by accumulation order only.
TOLERANCE = {torch.float16: 2e-2, torch.float32: 1e-4}


def mask_2to4(model: nn.Module) -> int:
    """Magnitude 2:4 on every layer sparsify converts (along Cin for convs), in place: the masked dense model."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and ineligible_reason(module) is None:
                w = module.weight
                if w.dim() == 2:
                    keep = ops.nm_mask(w)
                else:
                    keep = ops.matrix_to_conv_weight(ops.nm_mask(ops.conv_weight_to_matrix(w)), tuple(w.shape))
                w.mul_(keep)
                count += 1
    return count


def _output(result) -> torch.Tensor:
    return result.sample if hasattr(result, "sample") else result[0]


def run_model(name, batch, make_inputs, device, dtype, deadline: Deadline, min_run_time: float, save) -> list[dict]:
    """Rows of the masked dense model and each backend; save(rows) after each, so a timeout keeps what ran."""
    t0 = time.monotonic()
    torch.manual_seed(0)
    model = build(name, seed=0, device=device).to(dtype).eval()
    if device.type == "cpu" and hasattr(model, "transformer_blocks"):  # a dry run: one block shows the logic
        model.transformer_blocks = model.transformer_blocks[:1]
    masked_layers = mask_2to4(model)
    torch.manual_seed(1)
    inputs = make_inputs(batch, device, dtype)
    with torch.inference_mode():
        expected = _output(model(**inputs)).clone()
        dense_time = time_ms(lambda: model(**inputs), device, min_run_time)
    base = {"model": name, "batch": batch, "dtype": str(dtype)[6:], "device": device.type}
    rows = [{**base, "backend": "masked dense", **dense_time, "masked_layers": masked_layers,
             "build_s": round(time.monotonic() - t0, 1)}]  # fmt: skip
    for backend in BACKENDS:
        if deadline.passed():
            rows.append({**base, "backend": backend, "status": "not run (deadline)"})
            continue
        row = {**base, "backend": backend}
        t1 = time.monotonic()
        try:
            sparse = copy.deepcopy(model)
            report = sparsify(sparse, backend=backend)
            with torch.inference_mode():
                out = _output(sparse(**inputs))  # the first forward: auto decides here
                synchronize(device)
                row["first_forward_s"] = round(time.monotonic() - t1, 2)
                errors = max_errors(out, expected)
                row.update(errors, ok=errors["nan_extra"] == 0 and errors["max_rel_err"] <= TOLERANCE[dtype])
                timing = time_ms(lambda s=sparse: s(**inputs), device, min_run_time)
            paths = collections.Counter(run[0] if run else "not run" for run in report.runtime().values())
            reasons = collections.Counter(report.dense_fallback_layers.values())
            picks = collections.Counter(d.get("backend") for per_layer in report.auto_decisions().values()
                                        for d in per_layer.values())  # fmt: skip
            row.update(timing, speedup_vs_dense=dense_time["median_ms"] / timing["median_ms"],
                       converted=len(report.converted), skipped=len(report.skipped), bytes_saved=report.bytes_saved,
                       paths=dict(paths), fallback_reasons=dict(reasons.most_common(3)),
                       auto_picks=dict(picks))  # fmt: skip
        except Exception as exc:  # this backend's failure is its row; the next backend still runs
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        row["seconds"] = round(time.monotonic() - t1, 1)
        rows.append(row)
        save(rows)
        print(f"{name} {backend}: " + ", ".join(f"{k}={row[k]}" for k in ("ok", "speedup_vs_dense", "paths", "error")
                                                 if k in row))  # fmt: skip
    model = sparse = None  # noqa: F841  (frees the GPU memory before the next model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def headline(rows: list[dict]) -> dict:
    return {f"{r['model']} {r['backend']}": {k: r.get(k) for k in ("ok", "speedup_vs_dense", "max_rel_err", "paths")}
            for r in rows if r["backend"] != "masked dense"}  # fmt: skip


def main() -> int:
    args = parse_args(__doc__)
    device = device_for(args)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    deadline = Deadline(args.deadline, margin_s=3.0)
    rows: list[dict] = []

    def save(more: list[dict]) -> None:
        done = rows + more
        write_json(args.out / "e2e.json", {"dry_run": args.dry_run, "headline": headline(done), "rows": done})

    for name, (batch, make_inputs) in (DRY_MODELS if args.dry_run else MODELS).items():
        if deadline.passed():
            rows.append({"model": name, "backend": "*", "status": "not run (deadline)"})
            continue
        try:
            min_run_time = 0.02 if args.dry_run else 0.3
            rows += run_model(name, batch, make_inputs, device, dtype, deadline, min_run_time, save)
        except Exception as exc:  # e.g. the model does not build (no diffusers): the next model still runs
            rows.append({"model": name, "backend": "*", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
        save([])
    save([])
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
