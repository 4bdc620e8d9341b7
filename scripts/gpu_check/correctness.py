"""Step 2 of gpu-check.sh: every CUDA/Triton/NVRTC kernel against prunedm.ops.reference (float64 for the GEMMs)
at odd and real DiT-XL/2 / SD-1.5 shapes, fp16 and bf16, every epilogue, NCHW and NHWC, allocator poisoned."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import torch

# _common first: it puts the repository root on sys.path for prunedm and bench.
from _common import Deadline, device_for, max_errors, parse_args, poison_allocator, synchronize, write_json

from prunedm import ops
from prunedm.ops import reference

GROUPS = ("masks", "compress", "gumbel", "linear", "conv")
ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")
# Allowed max |got - float64 reference| relative to the reference's largest magnitude: the kernels accumulate
# in float32 and round once, so a few output ulps (fp16 2^-11, bf16 2^-8) plus accumulation-order noise.
GEMM_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
GUMBEL_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}
# A hard Gumbel sample may flip at a near-tie of keys when the device's log differs in the last bit.
HARD_MISMATCH_FRACTION = 1e-4
# What the backends say when they cannot run here: a skip, not a failure.
UNAVAILABLE = ("cannot run here", "not available", "no triton kernel", "no CUDA device")


def _backends(group: str, device: torch.device) -> list[str]:
    """The fast backends of a group; a dry run adds the reference, so the checks run even without a build."""
    if device.type != "cuda":
        return ["reference", "extension"] if group in ("linear", "conv") else ["reference", "extension", "triton"]
    return ["extension", "nvrtc"] if group in ("linear", "conv") else ["extension", "triton"]


def _dtypes(device: torch.device, group: str) -> list[torch.dtype]:
    if device.type != "cuda":
        return [torch.float32]  # the CPU twin and the Triton interpreter, kept quick
    return [torch.float16, torch.bfloat16] + ([torch.float32] if group in ("masks", "gumbel") else [])


def _random_2to4(rows: int, cols: int, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g)
    return (dense * reference.nm_mask_ref(dense, 2, 4)).to(device=device, dtype=dtype)


class Runner:
    """Runs cases, records each one's errors and status, stops starting new ones at the deadline."""

    def __init__(self, device: torch.device, deadline: Deadline):
        self.device, self.deadline, self.cases = device, deadline, []

    def case(self, record: dict, call, check) -> None:
        """call() -> output (the allocator is poisoned first); check(output) -> (ok, error fields)."""
        if self.deadline.passed():
            self.cases.append({**record, "status": "not run (deadline)"})
            return
        t0 = time.perf_counter()
        try:
            poison_allocator(self.device, record.pop("out_bytes", 1 << 20))
            out = call()
            synchronize(self.device)
            ok, fields = check(out)
            record.update(fields, status="pass" if ok else "FAIL")
        except Exception as exc:  # a kernel's error is this case's result, the next case still runs
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            record.update(status="skipped" if any(u in text for u in UNAVAILABLE) else "ERROR", error=text)
            if "CUDA error" in text or "illegal" in text:  # a sticky error: nothing after it can be trusted
                self.cases.append({**record, "seconds": round(time.perf_counter() - t0, 4)})
                raise
        record["seconds"] = round(time.perf_counter() - t0, 4)
        self.cases.append(record)


def _exact(expected):
    def check(out):
        got = out if isinstance(out, (tuple, list)) else (out,)
        want = expected if isinstance(expected, (tuple, list)) else (expected,)
        mismatched = sum(int((g.cpu() != w.cpu()).sum()) for g, w in zip(got, want))
        return mismatched == 0 and len(got) == len(want), {"mismatched": mismatched}

    return check


def _close(expected: torch.Tensor, tolerance: float):
    def check(out):
        errors = max_errors(out, expected)
        ok = errors["nan_extra"] == 0 and errors["max_rel_err"] <= tolerance
        return ok, {**errors, "tolerance": tolerance}

    return check


def masks_cases(run: Runner, dry: bool) -> None:
    shapes = [(7, 12), (3, 5, 32)] if dry else [(7, 12), (3, 5, 40), (33, 100), (3456, 1152), (1152, 4608)]
    nms = [(2, 4), (1, 4), (4, 8)] if not dry else [(2, 4), (4, 8)]
    for dtype, shape, (n, m) in itertools.product(_dtypes(run.device, "masks"), shapes, nms):
        if shape[-1] % m:
            continue
        g = torch.Generator().manual_seed(len(run.cases))
        x = torch.randn(shape, generator=g).to(device=run.device, dtype=dtype)
        x[..., ::5] = 0  # zeros and ties exercise the tie-break
        expected = reference.nm_mask_ref(x, n, m)
        sparse = x * expected
        sparse[..., 0] = 1  # some groups over n non-zeros when n < m - 1
        want = reference.nm_violations_ref(sparse, n, m)
        for backend in _backends("masks", run.device):
            base = {"backend": backend, "dtype": str(dtype)[6:], "shape": list(shape), "nm": f"{n}:{m}"}
            run.case({"op": "nm_mask", **base, "out_bytes": x.numel()},
                     lambda b=backend: ops.nm_mask(x, n, m, backend=b), _exact(expected))  # fmt: skip
            run.case({"op": "nm_violations", **base, "out_bytes": 8},
                     lambda b=backend: torch.as_tensor(ops.nm_violations(sparse, n, m, backend=b)),
                     _exact(want))  # fmt: skip


def compress_cases(run: Runner, dry: bool) -> None:
    shapes = [(32, 32), (64, 96)] if dry else [(32, 32), (96, 160), (3456, 1152), (1152, 4608), (320, 2880),
                                               (10240, 1280), (1280, 11520)]  # fmt: skip
    dtypes = [torch.float16, torch.bfloat16] if not dry else [torch.float16]
    for dtype, shape in itertools.product(dtypes, shapes):
        dense = _random_2to4(*shape, dtype, run.device, seed=len(run.cases))
        values, meta = reference.compress_2to4_ref(dense)
        nbytes = dense.numel() * 2
        for backend in _backends("compress", run.device):
            base = {"backend": backend, "dtype": str(dtype)[6:], "shape": list(shape)}
            run.case({"op": "compress_2to4", **base, "out_bytes": nbytes},
                     lambda b=backend: ops.compress_2to4(dense, backend=b), _exact((values, meta)))  # fmt: skip
            run.case({"op": "decompress_2to4", **base, "out_bytes": nbytes},
                     lambda b=backend: ops.decompress_2to4(values, meta, backend=b), _exact(dense))  # fmt: skip


def _gumbel_grad(fn, logits: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    leaf = logits.detach().clone().requires_grad_(True)
    (fn(leaf) * grad).sum().backward()
    return leaf.grad


def gumbel_cases(run: Runner, dry: bool) -> None:
    nm_shapes = [(4, 16)] if dry else [(7, 12), (3, 5, 16), (1152, 1152)]
    pattern_specs = [((4, 3), 2, 4)]
    if not dry:  # m = 16: 120 patterns a group, the size the Triton kernel's table may not hold
        pattern_specs = [((7, 3), 2, 4), ((1152, 288), 2, 4), ((64, 16), 2, 8), ((8, 2), 2, 16)]
    seed, tau = 1234, 0.7
    specs = [("gumbel_nm_sample", shape, 2, 4) for shape in nm_shapes]
    specs += [("gumbel_pattern_sample", (*groups, ops.nm_patterns(n, m).shape[0]), n, m)
              for groups, n, m in pattern_specs]  # fmt: skip
    for dtype, (op, shape, n, m) in itertools.product(_dtypes(run.device, "gumbel"), specs):
        tolerance = GUMBEL_TOLERANCE[dtype]
        fast, ref = getattr(ops, op), getattr(reference, f"{op}_ref")
        g = torch.Generator().manual_seed(len(run.cases))
        x = torch.randn(shape, generator=g).to(device=run.device, dtype=dtype)
        # The mask's shape: the logits' for gumbel_nm_sample, [..., G * m] for pattern logits [..., G, C(m, n)].
        grad = torch.randn(shape if op == "gumbel_nm_sample" else (*shape[:-2], shape[-2] * m), generator=g)
        grad = grad.to(device=run.device, dtype=dtype)
        # The reference in float64 on the 16-bit inputs' exact values (on the device: Philox on big shapes is slow).
        expected_hard = ref(x.double(), n, m, tau, True, seed)
        expected_soft = ref(x.double(), n, m, tau, False, seed)
        want_grad = _gumbel_grad(lambda t: ref(t, n, m, tau, False, seed), x.double(), grad.double())

        def hard_check(out, expected=expected_hard):
            flips = int((out.double() != expected).sum())
            return flips <= HARD_MISMATCH_FRACTION * expected.numel(), {"mismatched": flips}

        for backend in _backends("gumbel", run.device):
            base = {"op": op, "backend": backend, "dtype": str(dtype)[6:], "shape": list(shape), "nm": f"{n}:{m}"}
            run.case({**base, "mode": "hard"}, lambda b=backend: fast(x, n, m, tau, True, seed, backend=b), hard_check)
            run.case({**base, "mode": "soft"}, lambda b=backend: fast(x, n, m, tau, False, seed, backend=b),
                     _close(expected_soft, tolerance))  # fmt: skip
            run.case({**base, "mode": "backward"},
                     lambda b=backend: _gumbel_grad(lambda t: fast(t, n, m, tau, False, seed, backend=b), x, grad),
                     _close(want_grad, tolerance * 4))  # fmt: skip


def _epilogues(full: bool) -> list[tuple[str, bool, bool]]:
    """(activation, bias, residual): every combination on the odd shapes, three on the big ones."""
    if full:
        return list(itertools.product(ACTIVATIONS, (False, True), (False, True)))
    return [("none", False, False), ("gelu", True, True), ("silu", True, False)]


def _gemm_operands(run: Runner, dtype, rows: int, k: int, input_shape, output_shape):
    """(input, values, meta, bias, residual) in dtype on the device, and the same values in float64."""
    g = torch.Generator().manual_seed(len(run.cases))
    weight = _random_2to4(rows, k, dtype, run.device, seed=len(run.cases))
    values, meta = reference.compress_2to4_ref(weight)
    x = torch.randn(input_shape, generator=g).to(device=run.device, dtype=dtype)
    bias = torch.randn(rows, generator=g).to(device=run.device, dtype=dtype)
    res = torch.randn(output_shape, generator=g).to(device=run.device, dtype=dtype)
    return (x, values, meta, bias, res), (x.double(), values.double(), meta, bias.double(), res.double())


def linear_cases(run: Runner, dry: bool) -> None:
    # (input shape, out features, label); K and out are multiples of 32 (compress_2to4's tiles).
    odd = [((7, 64), 32, "odd"), ((3, 5, 96), 64, "odd-3d")]
    real = [((1, 160), 96, "odd-m1"), ((33, 96), 32, "odd-m33"), ((130, 160), 96, "odd-m130"),
            ((2, 77, 768), 320, "sd15.attn2.to_k"), ((512, 1152), 1152, "dit-xl2.to_q b2"),
            ((512, 1152), 4608, "dit-xl2.ff_in b2"), ((512, 4608), 1152, "dit-xl2.ff_out b2"),
            ((8192, 320), 320, "sd15.attn1.to_q b2"), ((8192, 320), 2560, "sd15.geglu b2"),
            ((2048, 640), 640, "sd15.attn_640 b2"), ((128, 1280), 1280, "sd15.attn_1280 b2")]  # fmt: skip
    for dtype, (in_shape, out_features, label) in itertools.product(
        _dtypes(run.device, "linear"), odd if dry else odd + real
    ):
        operands, operands64 = _gemm_operands(run, dtype, out_features, in_shape[-1], in_shape,
                                              (*in_shape[:-1], out_features))  # fmt: skip
        for activation, with_bias, with_res in _epilogues(label.startswith("odd")):
            x64, v64, meta, b64, r64 = operands64
            expected = reference.sparse_linear_2to4_ref(
                x64, v64, meta, b64 if with_bias else None, activation, r64 if with_res else None
            )
            for backend in _backends("linear", run.device):
                record = {"op": "sparse_linear_2to4", "backend": backend, "dtype": str(dtype)[6:], "shape": label,
                          "input": list(in_shape), "out_features": out_features, "activation": activation,
                          "bias": with_bias, "residual": with_res,
                          "out_bytes": expected.numel() * operands[0].element_size()}  # fmt: skip

                def call(act=activation, wb=with_bias, wr=with_res, b=backend):
                    xi, vi, mi, bi, ri = operands
                    return ops.sparse_linear_2to4(xi, vi, mi, bi if wb else None, activation=act,
                                                  residual=ri if wr else None, backend=b)  # fmt: skip

                run.case(record, call, _close(expected, GEMM_TOLERANCE[dtype]))


def conv_cases(run: Runner, dry: bool) -> None:
    # (N, Cin, H, W, Cout, kh, kw, stride, padding, dilation, label); kh*kw*Cin and Cout multiples of 32.
    odd = [(2, 32, 5, 7, 32, 3, 3, 1, 1, 1, "odd 3x3"), (2, 64, 5, 7, 32, 1, 1, 1, 0, 1, "odd 1x1")]
    real = [(3, 32, 9, 13, 64, 3, 3, 2, 1, 1, "odd 3x3 s2"), (3, 32, 9, 13, 32, 3, 3, 1, 2, 2, "odd 3x3 d2"),
            (3, 32, 9, 13, 64, 3, 1, 1, 0, 1, "odd 3x1"), (1, 96, 7, 7, 96, 3, 3, 1, 1, 1, "odd cin96"),
            (2, 320, 64, 64, 320, 3, 3, 1, 1, 1, "sd15.conv_320 b2"),
            (2, 320, 64, 64, 320, 3, 3, 2, 1, 1, "sd15.downsample_320 b2"),
            (2, 640, 32, 32, 640, 3, 3, 1, 1, 1, "sd15.conv_640 b2"),
            (2, 320, 32, 32, 640, 1, 1, 1, 0, 1, "sd15.shortcut_320_640 b2"),
            (2, 1280, 8, 8, 1280, 3, 3, 1, 1, 1, "sd15.conv_1280 b2")]  # fmt: skip
    formats = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    for dtype, spec in itertools.product(_dtypes(run.device, "conv"), odd if dry else odd + real):
        n, cin, h, w, cout, kh, kw, stride, padding, dilation, label = spec
        shape = (cout, cin, kh, kw)
        ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
        wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
        operands, operands64 = _gemm_operands(run, dtype, cout, kh * kw * cin, (n, cin, h, w), (n, cout, ho, wo))
        for activation, with_bias, with_res in _epilogues(label == "odd 3x3"):
            x64, v64, meta, b64, r64 = operands64
            bias64, res64 = b64 if with_bias else None, r64 if with_res else None
            expected = reference.sparse_conv2d_2to4_ref(
                x64, v64, meta, shape, bias64, stride, padding, dilation, activation, res64
            )
            for fmt, backend in itertools.product(formats, _backends("conv", run.device)):
                x, values, _, bias, res = operands
                x, res = x.contiguous(memory_format=formats[fmt]), res.contiguous(memory_format=formats[fmt])
                record = {"op": "sparse_conv2d_2to4", "backend": backend, "dtype": str(dtype)[6:], "shape": label,
                          "format": fmt, "input": [n, cin, h, w], "weight": list(shape), "stride": stride,
                          "padding": padding, "dilation": dilation, "activation": activation, "bias": with_bias,
                          "residual": with_res, "out_bytes": res.numel() * res.element_size()}  # fmt: skip

                def call(act=activation, wb=with_bias, wr=with_res, fm=fmt, b=backend, x=x, res=res, v=values, bi=bias):
                    out = ops.sparse_conv2d_2to4(x, v, meta, shape, bi if wb else None, stride=stride,
                                                 padding=padding, dilation=dilation, activation=act,
                                                 residual=res if wr else None, backend=b)  # fmt: skip
                    # The output follows the input's memory format: a wrong one is a failure too.
                    if b != "reference" and not out.is_contiguous(memory_format=formats[fm]):
                        raise AssertionError(f"output is not {fm}")
                    return out

                run.case(record, call, _close(expected, GEMM_TOLERANCE[dtype]))


def run_group(group: str, args) -> int:
    device = device_for(args)
    runner = Runner(device, Deadline(args.deadline, margin_s=1.0))
    status = 0
    try:
        globals()[f"{group}_cases"](runner, args.dry_run)
    except Exception as exc:  # a sticky CUDA error: record it, end this child (the others still run)
        runner.cases.append({"op": group, "status": "ERROR", "error": f"aborted: {type(exc).__name__}: {exc}"[:300]})
        status = 1
    write_json(args.work / f"correctness-{group}.json", {"group": group, "device": str(device), "cases": runner.cases})
    return status


def main() -> int:
    def extra(parser):
        parser.add_argument("--groups", default=None, help="comma-separated groups to run in this process")
        parser.add_argument("--jobs", type=int, default=5, help="child processes run in parallel")

    args = parse_args(__doc__, extra)
    if args.groups:
        unknown = sorted(set(args.groups.split(",")) - set(GROUPS))
        if unknown:
            raise SystemExit(f"--groups: unknown {unknown}, expected some of {GROUPS}")
        return max(run_group(group, args) for group in args.groups.split(","))
    # One process per group on a GPU: a kernel that faults leaves a sticky CUDA error that would end every group
    # after it. A dry run has no such errors and puts all groups in one child (each child imports torch anew).
    batches = [",".join(GROUPS)] if args.dry_run else list(GROUPS)
    start, running, results = time.monotonic(), {}, {}
    while batches or running:
        while batches and len(running) < max(1, args.jobs):
            batch = batches.pop(0)
            left = max(1.0, args.deadline - time.monotonic() - 1.0)
            cmd = [sys.executable, __file__, "--groups", batch, "--out", str(args.out), "--work", str(args.work),
                   "--seconds", f"{left:.1f}"] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
            running[batch] = subprocess.Popen(cmd)
        for batch, proc in list(running.items()):
            if proc.poll() is not None:
                results.update(dict.fromkeys(batch.split(","), proc.returncode))
                del running[batch]
        time.sleep(0.2)
    cases = []
    for group in GROUPS:
        path = args.work / f"correctness-{group}.json"
        if path.exists():
            import json

            cases += json.loads(path.read_text())["cases"]
        else:
            cases.append({"op": group, "status": "ERROR", "error": f"the child exited {results.get(group)}, no result"})
    counts = {s: sum(c["status"] == s for c in cases) for s in sorted({c["status"] for c in cases})}
    worst = {}
    for c in cases:
        if "max_rel_err" in c:
            key = f"{c['op']} {c['backend']} {c['dtype']}"
            worst[key] = max(worst.get(key, 0.0), c["max_rel_err"])
    summary = {"counts": counts, "worst_rel_err": worst, "seconds": round(time.monotonic() - start, 1),
               "dry_run": args.dry_run, "cases": cases}  # fmt: skip
    write_json(args.out / "correctness.json", summary)
    print(f"correctness: {counts} in {summary['seconds']} s")
    for c in cases:
        if c["status"] in ("FAIL", "ERROR"):
            print("  ", {k: v for k, v in c.items() if k not in ("seconds",)})
    return 0 if not counts.get("FAIL") and not counts.get("ERROR") else 1


if __name__ == "__main__":
    raise SystemExit(main())
