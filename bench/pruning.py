"""Latency of structurally pruned diffusion models against their dense originals, in one run.

UNet: google/ddpm-cifar10-32's architecture, dense and channel-pruned (Diff-Pruning ratios 0.3 and
0.5), 32x32 at batch 8. DiT: dense and with every other block removed (256px latents, 32x32x4).
Weights are random (structure is what sets latency); each pruned model's output shape is checked
before it is timed.

    python -m bench.pruning --out bench/out [--device cpu|cuda] [--dit s-2|b-2|l-2|xl-2] [--quick]"""

from __future__ import annotations

import copy
import statistics

import torch

from prunedm.architectures import DIT_SIZES, build
from prunedm.measure import time_ms
from prunedm.pruning import count_macs_and_params, keep_every, prune_channels, prune_depth

from .common import bench_parser, environment, resolve_device, write_results


def ddpm_cifar10():
    return build("ddpm-cifar10-32")


def dit(size: str):
    return build(f"dit-{size}")


def _forward(model, inputs: dict, device: torch.device, compiled: bool = False):
    """A no-argument forward of `model` on `inputs`; compiled: through torch.compile (inductor) with
    weight freezing, conv models in channels_last (what inductor's CPU conv path prefers)."""
    model = model.to(device).eval()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if compiled and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            return model(**inputs).sample

    if not compiled:
        return forward
    import torch._inductor.config as inductor_config

    compiled_forward = torch.compile(forward)
    # Freezing constant-folds and prepacks the (inference-only) weights; patched only while compiling
    # (the first call, outside the timed region) so the caller's process keeps its inductor settings.
    with inductor_config.patch(freezing=True), torch.inference_mode():
        compiled_forward()
    return compiled_forward


def bench_unet(
    batch: int, ratios: list[float], device: torch.device, min_run_time: float, rounds: int, compiled: bool = False
) -> list[dict]:
    torch.manual_seed(0)
    dense = ddpm_cifar10().eval()
    inputs = {"sample": torch.randn(batch, 3, 32, 32), "timestep": torch.randint(0, 1000, (batch,))}
    count_inputs = {"sample": inputs["sample"][:1], "timestep": inputs["timestep"][:1]}
    variants = [("dense", dense)]
    for ratio in ratios:
        pruned = copy.deepcopy(dense)
        prune_channels(pruned, "magnitude", ratio, example_inputs=count_inputs)
        with torch.inference_mode():
            assert pruned(**inputs).sample.shape == (batch, 3, 32, 32)
        variants.append((f"channels-{ratio}", pruned))
    return _rows("ddpm-cifar10-32 unet", variants, inputs, count_inputs, batch, device, min_run_time, rounds, compiled)


def bench_dit(
    size: str, batch: int, device: torch.device, min_run_time: float, rounds: int, compiled: bool = False
) -> list[dict]:
    torch.manual_seed(0)
    dense = dit(size).eval()
    inputs = {
        "hidden_states": torch.randn(batch, 4, 32, 32),
        "timestep": torch.randint(0, 1000, (batch,)),
        "class_labels": torch.randint(0, 1000, (batch,)),
    }
    count_inputs = {k: v[:1] for k, v in inputs.items()}
    half = copy.deepcopy(dense)
    prune_depth(half, keep_every(len(dense.transformer_blocks), 2))
    with torch.inference_mode():
        assert half(**inputs).sample.shape == (batch, 8, 32, 32)
    variants = [("dense", dense), (f"depth-{len(half.transformer_blocks)}of{len(dense.transformer_blocks)}", half)]
    return _rows(f"dit-{size}", variants, inputs, count_inputs, batch, device, min_run_time, rounds, compiled)


def _rows(
    model_name, variants, inputs, count_inputs, batch, device, min_run_time, rounds, compiled=False
) -> list[dict]:
    """Time the variants in interleaved rounds (dense, pruned, dense, ...) so that load on a shared
    machine hits them alike; the speedup is the median over rounds of the per-round ratio."""
    counts = [count_macs_and_params(model.eval(), count_inputs) for _, model in variants]
    forwards = [_forward(model, inputs, device, compiled) for _, model in variants]
    timings = [[time_ms(fn, device, min_run_time=min_run_time) for fn in forwards] for _ in range(rounds)]
    rows = []
    for i, ((variant, _), (macs, params)) in enumerate(zip(variants, counts)):
        medians = [round_[i]["median_ms"] for round_ in timings]
        speedups = [round_[0]["median_ms"] / round_[i]["median_ms"] for round_ in timings]
        row = {"model": model_name, "variant": variant, "batch": batch, "dtype": "float32", "device": device.type,
               "execution": "torch.compile (inductor, freezing)" if compiled else "eager",
               "params": params, "macs_per_sample": macs, "median_ms": statistics.median(medians),
               "round_min_ms": min(medians), "round_max_ms": max(medians), "rounds": rounds,
               "speedup_vs_dense": statistics.median(speedups), "params_ratio": params / counts[0][1],
               "macs_ratio": macs / counts[0][0]}  # fmt: skip
        rows.append(row)
        print(
            f"{model_name} {variant}: {params / 1e6:.2f}M params, {macs / 1e9:.2f} GMACs/sample, "
            f"{row['median_ms']:.1f} ms at batch {batch}, {row['speedup_vs_dense']:.2f}x vs dense "
            f"(MACs {row['macs_ratio']:.2f}x)"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "pruning", quick="batch 2, ratio 0.5 only, DiT-S/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dit", default=None, choices=list(DIT_SIZES), help="default: s-2 on CPU, xl-2 on GPU")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per model and round (CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--compile", action="store_true", help="time every model through torch.compile (inductor)")
    parser.add_argument("--skip-dit", action="store_true", help="UNet rows only")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    batch = 2 if args.quick else args.batch
    ratios = [0.5] if args.quick else [0.3, 0.5]
    dit_size = "s-2" if args.quick else args.dit or ("xl-2" if device.type == "cuda" else "s-2")
    rows = bench_unet(batch, ratios, device, args.min_run_time, args.rounds, args.compile)
    if not args.skip_dit:
        rows += bench_dit(dit_size, batch, device, args.min_run_time, args.rounds, args.compile)
    name = "pruning-compiled" if args.compile else "pruning"
    json_path, csv_path = write_results(args.out, name, environment(device), rows)
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
