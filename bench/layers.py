"""Per-layer benchmark of 2:4 sparse layers against dense, on every Linear and Conv2d shape of real models.

Shapes (weights and per-sample activations) are harvested by running the google/ddpm-cifar10-32
UNet, the Stable Diffusion 1.5 UNet and DiT-XL/2 configs on the meta device. Each unique layer is
timed at each batch size as: `dense` (nn.Linear/nn.Conv2d holding the masked weight: cuBLAS/cuDNN
or the CPU BLAS), then SparseLinear/SparseConv2d as `sparse[dense]` (decompress per call),
`sparse[torch]` (torch.sparse 2:4 kernels; GPU only), `sparse[prunedm]` (prunedm's own kernels, when
built) and `sparse[auto]` (timed per shape, cached). Every output is checked against dense, and each
row records the time ratio to dense measured in the same run and the path the layer really took
("ran"). On CPU no fast sparse kernel exists: the sparse rows measure reference paths and say so
("kind": "cpu-reference"; device column and environment say cpu).

    python -m bench.layers --out bench/out [--device cpu|cuda] [--quick] [--models ddpm,sd15,dit]"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn as nn

from prunedm import ops
from prunedm.architectures import build
from prunedm.measure import time_ms
from prunedm.nn import SparseConv2d, SparseLinear
from prunedm.nn.sparsify import VERIFY_TOLERANCES, ineligible_reason

from .common import bench_parser, environment, plot_speedups, resolve_device, write_results

BATCHES = (1, 2, 4, 8, 16, 32, 64)
# One representative layer per model for --quick: a 3x3 conv, a cross-attention UNet linear, a DiT linear.
QUICK_LAYERS = {
    "ddpm": "down_blocks.1.resnets.0.conv2",
    "sd15": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "dit": "transformer_blocks.0.attn1.to_q",
}


def _model_specs() -> dict:
    """name -> (label, build(), example (args, kwargs) at batch 1)."""
    return {
        "ddpm": (
            "ddpm-cifar10-32",
            lambda: build("ddpm-cifar10-32"),
            lambda: ((torch.randn(1, 3, 32, 32), torch.tensor([10])), {}),
        ),
        "sd15": (
            "sd15-unet",
            lambda: build("sd15-unet"),
            lambda: ((torch.randn(1, 4, 64, 64), torch.tensor([10]), torch.randn(1, 77, 768)), {}),
        ),
        "dit": (
            "dit-xl-2",
            lambda: build("dit-xl-2"),
            lambda: ((torch.randn(1, 4, 32, 32),), dict(timestep=torch.tensor([10]), class_labels=torch.tensor([1]))),
        ),
    }


@dataclasses.dataclass
class Layer:
    model: str
    name: str  # the first layer of the model with this shape
    count: int  # how many layers of the model share it
    module: nn.Module  # on the meta device: the shape and conv arguments
    sample_shape: tuple[int, ...]  # the input of one sample (batch dim removed)

    @property
    def op(self) -> str:
        return "linear" if isinstance(self.module, nn.Linear) else "conv2d"

    @property
    def key(self) -> tuple:
        m = self.module
        if isinstance(m, nn.Linear):
            return ("linear", m.out_features, m.in_features, m.bias is not None, self.sample_shape)
        return ("conv2d", tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups, m.bias is not None,
                self.sample_shape)  # fmt: skip

    @property
    def shape_text(self) -> str:
        m = self.module
        if isinstance(m, nn.Linear):
            return f"linear {m.out_features}x{m.in_features} in {'x'.join(map(str, self.sample_shape))}"
        cout, cin, kh, kw = m.weight.shape
        padding = m.padding if isinstance(m.padding, str) else m.padding[0]
        return f"conv {cout}x{cin}x{kh}x{kw} s{m.stride[0]} p{padding} in {'x'.join(map(str, self.sample_shape))}"


def harvest(model_key: str) -> list[Layer]:
    """The unique Linear/Conv2d layers of a model config with their per-sample input shapes (meta device)."""
    label, build, example = _model_specs()[model_key]
    with torch.device("meta"):
        model = build().eval()
        args, kwargs = example()
        seen: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

        def record(name):
            def hook(module, inputs, output):  # returns None: the output is left alone
                seen.setdefault(name, (module, tuple(inputs[0].shape)))

            return hook

        hooks = [
            module.register_forward_hook(record(name))
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
        ]
        with torch.no_grad():
            model(*args, **kwargs)
        for hook in hooks:
            hook.remove()
    unique: dict[tuple, Layer] = {}
    for name, (module, shape) in seen.items():
        layer = Layer(label, name, 1, module, shape[1:])
        if layer.key in unique:
            unique[layer.key].count += 1
        else:
            unique[layer.key] = layer
    return list(unique.values())


def _dense_layer(layer: Layer, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """A real layer of the harvested shape with random weights, masked to magnitude 2:4 (along Cin for convs)."""
    torch.manual_seed(seed)
    m = layer.module
    if isinstance(m, nn.Linear):
        dense = nn.Linear(m.in_features, m.out_features, m.bias is not None)
    else:
        dense = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                          m.bias is not None, m.padding_mode)  # fmt: skip
    dense = dense.to(device=device, dtype=dtype).eval()
    weight = dense.weight.detach()
    if ineligible_reason(dense) is None:
        if weight.dim() == 2:
            keep = ops.nm_mask(weight)
        else:
            keep = ops.matrix_to_conv_weight(ops.nm_mask(ops.conv_weight_to_matrix(weight)), tuple(weight.shape))
        with torch.no_grad():
            dense.weight.copy_(torch.where(keep, weight, 0))
    return dense


def _backends(device: torch.device) -> list[str]:
    names = ["dense", "torch"] if device.type == "cuda" else ["dense"]
    return [*names, "prunedm", "auto"]


def bench_layer(layer: Layer, batch: int, dtype, device, min_run_time: float, seed: int = 0) -> list[dict]:
    dense = _dense_layer(layer, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((batch, *layer.sample_shape), generator=g).to(device=device, dtype=dtype)
    base = {
        "model": layer.model,
        "layer": layer.name,
        "count": layer.count,
        "op": layer.op,
        "shape": layer.shape_text,
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
    }
    rows = []
    with torch.no_grad():
        expected = dense(x)
        dense_time = time_ms(lambda: dense(x), device, min_run_time)
        dense_bytes = dense.weight.numel() * dense.weight.element_size()
        rows.append({**base, "backend": "dense", "ran": "dense", "kind": "dense", **dense_time, "ratio_to_dense": 1.0,
                     "speedup_vs_dense": 1.0, "max_abs_err": 0.0, "ok": True, "weight_bytes": dense_bytes,
                     "note": ""})  # fmt: skip
        reason = ineligible_reason(dense)
        if reason is not None:
            rows.append({**base, "backend": "sparse[*]", "ran": "skipped", "ok": True, "note": reason})
            return rows
        cls = SparseLinear if isinstance(dense, nn.Linear) else SparseConv2d
        rtol, atol = VERIFY_TOLERANCES[dtype]
        scale = max(float(expected.abs().max()), 1.0)
        for backend in _backends(device):
            sparse = cls.from_dense(dense, mask=dense.weight != 0, backend=backend)
            out = sparse(x)
            ran, why = sparse.last_run
            err = float((out.float() - expected.float()).abs().max())
            ok = bool(torch.allclose(out.float(), expected.float(), rtol=rtol, atol=atol * scale))
            timing = time_ms(lambda s=sparse: s(x), device, min_run_time)
            kind = (
                "cpu-reference" if device.type == "cpu" else ("dense-fallback" if ran == "dense" else "sparse-kernel")
            )
            rows.append({**base, "backend": f"sparse[{backend}]", "ran": ran, "kind": kind, **timing,
                         "ratio_to_dense": timing["median_ms"] / dense_time["median_ms"],
                         "speedup_vs_dense": dense_time["median_ms"] / timing["median_ms"],
                         "max_abs_err": err, "ok": ok, "weight_bytes": sparse.weight_nbytes,
                         "note": "" if ran != "dense" else why})  # fmt: skip
            del sparse
    return rows


def run_layers(
    device: torch.device,
    dtype: torch.dtype,
    models: list[str],
    batches: tuple[int, ...],
    quick: bool = False,
    min_run_time: float = 0.2,
    max_layers: int | None = None,
) -> list[dict]:
    """Rows for every unique layer of `models` (QUICK_LAYERS only with quick=True) at every batch size."""
    unknown = sorted(set(models) - set(_model_specs()))
    if unknown:
        raise ValueError(f"models must be among {sorted(_model_specs())}, got {unknown}")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batches must be positive ints, got {batches}")
    rows = []
    for model_key in models:
        layers = harvest(model_key)
        if quick:
            layers = [layer for layer in layers if layer.name == QUICK_LAYERS[model_key]]
        layers = layers[:max_layers] if max_layers else layers
        print(f"{model_key}: {len(layers)} unique layer shape(s)")
        for layer in layers:
            for batch in batches:
                new = bench_layer(layer, batch, dtype, device, min_run_time)
                rows += new
                timed = [r for r in new if r["backend"] != "dense" and "median_ms" in r]
                summary = ", ".join(f"{r['backend']}->{r['ran']} {r['ratio_to_dense']:.2f}x" for r in timed)
                print(
                    f"  {layer.shape_text} b{batch}: dense {new[0]['median_ms']:.3f} ms; {summary or new[-1]['note']}"
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "layers", quick="one layer per model at batch 1, short timings")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on cuda, float32 on cpu")  # fmt: skip
    parser.add_argument("--models", default="ddpm,sd15,dit", help="comma-separated subset of ddpm, sd15, dit")
    parser.add_argument("--batches", default=None, help=f"comma-separated batch sizes (default {BATCHES})")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else ((1,) if args.quick else BATCHES)
    min_run_time = 0.05 if args.quick else 0.2
    start = time.perf_counter()
    rows = run_layers(device, dtype, args.models.split(","), batches, args.quick, min_run_time)
    bad = [r for r in rows if not r["ok"]]
    env = environment(device)
    json_path, csv_path = write_results(args.out, "layers", env, rows)
    plot_speedups([r for r in rows if r["backend"] != "dense"], json_path.with_suffix(".png"), "speedup_vs_dense",
                  "shape", f"2:4 layers vs dense on {env['device']} ({env['commit']})")  # fmt: skip
    print(f"wrote {json_path} and {csv_path} ({len(rows)} rows, {time.perf_counter() - start:.0f} s, {device.type})")
    if bad:
        print(
            f"{len(bad)} row(s) whose output differs from dense: "
            + ", ".join(f"{r['layer']} {r['backend']}" for r in bad)
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
