"""Step 5 of gpu-check.sh: time ratios of prunedm's 2:4 kernels to cuBLAS/cuDNN (dense, same run) and cuSPARSELt
on the key DiT-XL/2 and SD-1.5 shapes (do_bench: warm-up, L2 flushed, median), each output checked first."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from _common import Deadline, device_for, max_errors, parse_args, write_json

from bench import layers as layers_bench
from bench import ops as ops_bench
from bench.common import write_results
from prunedm import ops
from prunedm.measure import time_ms
from prunedm.ops import reference

# (label, tokens M, K, out): the GEMMs of DiT-XL/2 at batch 8 (256 tokens a sample) and SD-1.5 at batch 2.
LINEAR_SHAPES = [
    ("dit-xl2.to_q b8", 2048, 1152, 1152), ("dit-xl2.ff_in b8", 2048, 1152, 4608),
    ("dit-xl2.ff_out b8", 2048, 4608, 1152), ("dit-xl2.to_q b1", 256, 1152, 1152),
    ("sd15.attn1.to_q 64x64 b2", 8192, 320, 320), ("sd15.geglu 64x64 b2", 8192, 320, 2560),
    ("sd15.ff_out 64x64 b2", 8192, 1280, 320), ("sd15.attn_1280 16x16 b2", 512, 1280, 1280),
]  # fmt: skip
# (label, N, Cin, H, W, Cout, k, stride, padding): SD-1.5 UNet convs at batch 2.
CONV_SHAPES = [
    ("sd15.conv_320 64x64 b2", 2, 320, 64, 64, 320, 3, 1, 1), ("sd15.conv_640 32x32 b2", 2, 640, 32, 32, 640, 3, 1, 1),
    ("sd15.conv_1280 16x16 b2", 2, 1280, 16, 16, 1280, 3, 1, 1), ("sd15.down_320 b2", 2, 320, 64, 64, 320, 3, 2, 1),
]  # fmt: skip
DRY_LINEAR = [("dry 64x64 m16", 16, 64, 64)]
DRY_CONV = [("dry 3x3 32", 1, 32, 6, 6, 32, 3, 1, 1)]
# Layers timed through bench.layers (dense / torch / prunedm / auto modules, the path each took), by model.
KEY_LAYERS = {
    "dit": ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"],
    "sd15": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1",
             "down_blocks.2.resnets.0.conv1"],
}  # fmt: skip
LAYER_BATCHES = {"dit": (1, 8), "sd15": (1, 2)}
# An output further than this from dense (relative to its largest value) is wrong: its timing is not reported.
CHECK_TOLERANCE = {torch.float16: 1e-2, torch.float32: 1e-4}


def _masked(out_features: int, k: int, dtype, device, seed: int) -> torch.Tensor:
    """A 2:4 weight whose values float16 holds exactly: on CPU, float32 runs are packed through float16."""
    w = torch.randn(out_features, k, generator=torch.Generator().manual_seed(seed)).half().float()
    return (w * reference.nm_mask_ref(w)).to(device=device, dtype=dtype)


def _cusparselt(weight: torch.Tensor):
    """torch's 2:4 tensor on cuSPARSELt, or (None, why not)."""
    if weight.device.type != "cuda":
        return None, "cuSPARSELt runs on CUDA only"
    if not torch.backends.cusparselt.is_available():
        return None, "this torch has no cuSPARSELt"
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return to_sparse_semi_structured(weight), ""


class Timer:
    def __init__(self, device, dtype, deadline: Deadline, dry: bool):
        self.device, self.dtype, self.deadline, self.rows = device, dtype, deadline, []
        self.min_run_time = 0.02 if dry else 0.2

    def row(self, base: dict, backend: str, fn, expected: torch.Tensor, dense_ms: float | None) -> float | None:
        """Check fn() against expected, then time it; a row either way. Returns the median ms (None if not timed)."""
        r = {**base, "backend": backend}
        try:
            errors = max_errors(fn(), expected)
            ok = errors["nan_extra"] == 0 and errors["max_rel_err"] <= CHECK_TOLERANCE[self.dtype]
            r.update(errors, ok=ok)
            if ok:
                r.update(time_ms(fn, self.device, self.min_run_time))
                if dense_ms:
                    r["ratio_to_dense"] = r["median_ms"] / dense_ms
                    r["speedup_vs_dense"] = dense_ms / r["median_ms"]
        except Exception as exc:  # unavailable here, or broken: the row says which
            r.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        self.rows.append(r)
        return r.get("median_ms")

    def linear(self, label, m, k, n, seed):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(self.device, self.dtype)
        weight = _masked(n, k, self.dtype, self.device, seed)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(self.device, self.dtype)
        values, meta = ops.compress_2to4(weight.half() if self.device.type == "cpu" else weight, backend="reference")
        values = values.to(self.dtype)
        expected = F.linear(x.double(), weight.double(), bias.double())
        base = {"op": "linear", "shape": label, "m": m, "k": k, "n": n, "dtype": str(self.dtype)[6:]}
        dense_ms = self.row(base, "dense (cuBLAS)" if self.device.type == "cuda" else "dense",
                            lambda: F.linear(x, weight, bias), expected, None)  # fmt: skip
        for backend in ("extension", "nvrtc"):
            self.row(
                base,
                f"prunedm[{backend}]",
                lambda b=backend: ops.sparse_linear_2to4(x, values, meta, bias, backend=b),
                expected,
                dense_ms,
            )
        sparse, why = _cusparselt(weight) if self.device.type == "cuda" else (None, "cuSPARSELt runs on CUDA only")
        if sparse is None:
            self.rows.append({**base, "backend": "torch cuSPARSELt", "ok": False, "error": why})
        else:
            self.row(base, "torch cuSPARSELt", lambda: F.linear(x, sparse, bias), expected, dense_ms)

    def conv(self, label, n, cin, h, w, cout, k, stride, padding, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, cin, h, w, generator=g).to(self.device, self.dtype)
        matrix = _masked(cout, k * k * cin, self.dtype, self.device, seed)
        shape = (cout, cin, k, k)
        weight = ops.matrix_to_conv_weight(matrix, shape)
        values, meta = ops.compress_2to4(matrix.half() if self.device.type == "cpu" else matrix, backend="reference")
        values = values.to(self.dtype)
        expected = F.conv2d(x.double(), weight.double(), None, stride, padding)
        base = {"op": "conv2d", "shape": label, "dtype": str(self.dtype)[6:]}
        for fmt, memory_format in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            xf, wf = x.to(memory_format=memory_format), weight.to(memory_format=memory_format)
            dense_ms = self.row({**base, "format": fmt}, "dense (cuDNN)" if self.device.type == "cuda" else "dense",
                                lambda: F.conv2d(xf, wf, None, stride, padding), expected, None)  # fmt: skip
            for backend in ("extension", "nvrtc"):
                self.row({**base, "format": fmt}, f"prunedm[{backend}]",
                         lambda b=backend: ops.sparse_conv2d_2to4(xf, values, meta, shape, None, stride=stride,
                                                                  padding=padding, backend=b),
                         expected, dense_ms)  # fmt: skip


def _layers(dry: bool) -> list:
    """bench.layers' Layer records: the key layers harvested from the real configs, or one tiny stand-in."""
    if dry:
        with torch.device("meta"):
            module = torch.nn.Linear(64, 64)
        return [(layers_bench.Layer("dry", "tiny.linear", 1, module, (16, 64)), (1,))]
    found = []
    for model, names in KEY_LAYERS.items():
        by_name = {layer.name: layer for layer in layers_bench.harvest(model)}
        found += [(by_name[name], LAYER_BATCHES[model]) for name in names if name in by_name]
    return found


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def headline(rows: list[dict]) -> dict:
    """Geometric-mean speedup over dense per (op, backend), from the kernel rows that passed their check."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if "speedup_vs_dense" in r and r.get("ok"):
            groups.setdefault(f"{r['op']} {r['backend']}{' ' + r['format'] if 'format' in r else ''}", []).append(
                r["speedup_vs_dense"]
            )
    return {key: round(_geomean(v), 3) for key, v in groups.items()}


def main() -> int:
    args = parse_args(__doc__)
    device = device_for(args)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    deadline = Deadline(args.deadline, margin_s=3.0)
    timer = Timer(device, dtype, deadline, args.dry_run)
    start, sections, layer_rows, op_rows = time.monotonic(), {}, [], []

    def save():
        data = {"device": str(device), "dtype": str(dtype)[6:], "sections_s": sections, "dry_run": args.dry_run,
                "headline": headline(timer.rows), "kernels": timer.rows, "layers": layer_rows,
                "ops": op_rows}  # fmt: skip
        write_json(args.out / "timing.json", data)

    t0 = time.monotonic()
    for i, spec in enumerate(DRY_LINEAR if args.dry_run else LINEAR_SHAPES):
        if deadline.passed():
            break
        timer.linear(*spec, seed=i)
    for i, spec in enumerate(DRY_CONV if args.dry_run else CONV_SHAPES):
        if deadline.passed():
            break
        timer.conv(*spec, seed=100 + i)
    sections["kernels"] = round(time.monotonic() - t0, 1)
    save()
    # Whole layers through bench.layers: the module overhead, torch's 2:4 path and what auto picks.
    t0 = time.monotonic()
    for layer, batches in _layers(args.dry_run):
        for batch in batches:
            if deadline.passed():
                break
            layer_rows += layers_bench.bench_layer(layer, batch, dtype, device, timer.min_run_time)
    sections["layers"] = round(time.monotonic() - t0, 1)
    save()
    # The 2:4 format ops (nm_mask, compress) against torch's converter, through bench.ops.
    t0 = time.monotonic()
    for name in ops_bench.QUICK_SHAPES[: 1 if args.dry_run else None]:
        if deadline.passed():
            break
        shape = (64, 64) if args.dry_run else ops_bench.SHAPES[name]
        op_rows += ops_bench.bench_shape(name, shape, torch.float16, device)
    sections["ops"] = round(time.monotonic() - t0, 1)
    save()
    write_results(args.work, "layers", {"device": str(device)}, layer_rows)
    print(f"timing: {len(timer.rows)} kernel rows, {len(layer_rows)} layer rows, {len(op_rows)} op rows in "
          f"{time.monotonic() - start:.0f} s; geomean speedup vs dense: {headline(timer.rows)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
