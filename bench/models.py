"""Whole-model benchmark: one denoising step and a full DDIM sampling loop, dense against pruned and 2:4.

Variants of each model: dense; structurally pruned (prune_channels at 50% for UNets, prune_depth
keeping every other block for DiTs); 2:4 sparsified (sparsify(), backend auto); and both. Rows give
latency (median, 20/80% quantiles), throughput, peak memory, parameters and MACs. Weights are random
(structure sets latency). On CPU no fast sparse kernel exists: 2:4 rows measure the reference path
("kind": "cpu-reference"), and peak memory is the process RSS high-water mark delta (/proc VmHWM).

    python -m bench.models --out bench/out [--device cpu|cuda] [--quick]"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from prunedm.architectures import build
from prunedm.measure import layer_macs, time_ms
from prunedm.nn import sparsify
from prunedm.pruning import count_macs_and_params, keep_every, prune_channels, prune_depth

from .common import bench_parser, environment, resolve_device, write_results

VARIANTS = ("dense", "pruned", "2:4", "pruned+2:4")
# name -> (kind, per-sample input shape): the models the full run measures; --quick takes QUICK_MODELS.
MODELS = {
    "ddpm-cifar10-32": ("unet", (3, 32, 32)),
    "dit-xl-2": ("dit", (4, 32, 32)),
    "dit-s-2": ("dit", (4, 32, 32)),
    "tiny-unet": ("unet", (1, 16, 16)),
}
FULL_MODELS = {"cuda": ["ddpm-cifar10-32", "dit-xl-2"], "cpu": ["ddpm-cifar10-32", "dit-s-2"]}
QUICK_MODELS = ["tiny-unet", "dit-s-2"]


def _inputs(name: str, batch: int, device, dtype, seed: int = 0, size: int | None = None) -> dict:
    kind, shape = MODELS[name]
    if size is not None:  # DiT's sin-cos position embedding follows the input size
        shape = (shape[0], size, size)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn((batch, *shape), generator=g).to(device=device, dtype=dtype)
    timestep = torch.full((batch,), 500, dtype=torch.long, device=device)
    if kind == "unet":
        return {"sample": sample, "timestep": timestep}
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return {"hidden_states": sample, "timestep": timestep, "class_labels": labels}


def _prune(model: nn.Module, name: str) -> nn.Module:
    kind, _ = MODELS[name]
    pruned = copy.deepcopy(model)
    if kind == "unet":
        example = _inputs(name, 1, "cpu", torch.float32)
        prune_channels(pruned, "magnitude", 0.5, example_inputs=example)
    else:
        prune_depth(pruned, keep_every(len(pruned.transformer_blocks), 2))
    return pruned


def peak_memory(fn, device: torch.device) -> tuple[float | None, float | None, str]:
    """(peak MiB above what was in use before fn, peak MiB in all, how it was measured).

    CUDA: max_memory_allocated (the caching allocator's own count). CPU: the process RSS high-water
    mark (/proc/self/status VmHWM, reset through clear_refs) against VmRSS before fn; memory that
    the C allocator kept from earlier runs is reused without raising RSS, so the delta is a lower bound."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - before) / 2**20, peak / 2**20, "cuda max_memory_allocated (delta: minus allocated before)"
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        before = _proc_kib(status, "VmRSS")
        fn()
        peak = _proc_kib(status, "VmHWM")
        return (
            (peak - before) / 1024,
            peak / 1024,
            "cpu process RSS: VmHWM after clear_refs (delta: minus VmRSS before)",
        )
    except OSError:
        fn()
        return None, None, "unavailable (no /proc/self/clear_refs)"


def _proc_kib(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in {status}")


def _sampler(model: nn.Module, name: str, inputs: dict, steps: int):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    kind, shape = MODELS[name]
    key = "sample" if kind == "unet" else "hidden_states"

    def sample():
        scheduler.set_timesteps(steps)
        x = inputs[key]
        extra = {k: v for k, v in inputs.items() if k not in (key, "timestep")}
        with torch.inference_mode():
            for t in scheduler.timesteps:
                timestep = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
                eps = model(x, timestep, **extra).sample[:, : shape[0]]  # DiT: drop the learned-sigma half
                x = scheduler.step(eps, t, x).prev_sample
        return x

    return sample


def bench_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    steps: int,
    rounds: int,
    min_run_time: float,
    variants: tuple[str, ...] = VARIANTS,
    size: int | None = None,
) -> list[dict]:
    """Rows for one model: each variant's single step and DDIM loop, with memory, params and MACs.

    size: the input's spatial size (default the model's own); MACs and params count at that size too."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants must be among {VARIANTS}, got {unknown}")
    dense = build(name, seed=0).eval()
    count_inputs = _inputs(name, 1, "cpu", torch.float32, size=size)
    pruned = _prune(dense, name) if any(v.startswith("pruned") for v in variants) else None
    inputs = _inputs(name, batch, device, dtype, size=size)
    key = "sample" if MODELS[name][0] == "unet" else "hidden_states"
    rows, dense_ms = [], {}
    for variant in variants:
        structural = pruned if variant.startswith("pruned") else dense
        macs, params = count_macs_and_params(structural, count_inputs)
        per_layer = layer_macs(structural, count_inputs)
        model = copy.deepcopy(structural).to(device=device, dtype=dtype).eval()
        sparse_macs = nonzero_saved = 0
        note, sparse_layers, fallback = "", 0, 0
        if variant.endswith("2:4"):
            report = sparsify(model)
            converted = {c.name for c in report.converted}
            sparse_macs = sum(m for n, m in per_layer.items() if n in converted)
            nonzero_saved = sum(torch.Size(c.weight_shape).numel() // 2 for c in report.converted)
            note = f"{len(report.converted)} layers 2:4, {len(report.skipped)} skipped"
        step = lambda m=model: m(**inputs)  # noqa: E731
        with torch.inference_mode():
            step()
            step_time = time_ms(lambda: step(), device, min_run_time)
        loop = _sampler(model, name, inputs, steps)
        loop_time = time_ms(loop, device, repeats=rounds)  # warm-up first: auto's timing happens there
        peak_mib, peak_total_mib, method = peak_memory(loop, device)
        if variant.endswith("2:4"):
            sparse_layers, fallback = len(report.sparse_kernel_layers), len(report.dense_fallback_layers)
        weights = {id(t): t for t in (*model.parameters(), *model.buffers())}
        weight_mib = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
        for mode, timing in (("step", step_time), (f"ddim-{steps}", loop_time)):
            dense_ms.setdefault(mode, timing["median_ms"])
            kind = "dense"
            if variant.endswith("2:4"):
                kind = "cpu-reference" if device.type == "cpu" else ("sparse-kernel" if sparse_layers else "dense")
            rows.append({
                "model": name, "variant": variant, "mode": mode, "batch": batch,
                "steps": 1 if mode == "step" else steps, "sample_shape": "x".join(map(str, inputs[key].shape[1:])),
                "dtype": str(dtype).removeprefix("torch."), "device": device.type, "kind": kind, **timing,
                "speedup_vs_dense": dense_ms[mode] / timing["median_ms"],
                "samples_per_s": batch / (timing["median_ms"] / 1e3),
                "peak_memory_mib": peak_mib, "peak_total_mib": peak_total_mib, "memory_method": method,
                "weights_mib": weight_mib,
                "params": params, "nonzero_params": params - nonzero_saved, "macs_per_sample": macs,
                "effective_macs_per_sample": macs - sparse_macs // 2, "sparse_kernel_layers": sparse_layers,
                "dense_fallback_layers": fallback, "note": note,
            })  # fmt: skip
        print(
            f"{name} {variant}: step {step_time['median_ms']:.2f} ms, ddim-{steps} {loop_time['median_ms']:.1f} ms "
            f"({rows[-1]['speedup_vs_dense']:.2f}x), {params / 1e6:.2f}M params, peak "
            f"{'n/a' if peak_mib is None else f'{peak_mib:.0f} MiB'} {note}"
        )
        del model
    return rows


def run_models(device: torch.device, quick: bool = False, models: list[str] | None = None) -> list[dict]:
    """Every model of the run at its batch size, in the device's dtype (float16 on CUDA, float32 on CPU).

    quick: QUICK_MODELS at batch 1, 16x16 inputs, a 2-step DDIM loop timed once (a smoke run)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    names = models or (QUICK_MODELS if quick else FULL_MODELS[device.type])
    batch, steps, rounds, size = (1, 2, 1, 16) if quick else (8, 25, 5, None)
    min_run_time = 0.02 if quick else 0.5
    rows = []
    for name in names:
        rows += bench_model(name, device, dtype, batch, steps, rounds, min_run_time, size=size)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "models", quick="tiny-unet and DiT-S/2 at 16x16, batch 1, 2 DDIM steps")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = run_models(device, args.quick, args.models.split(",") if args.models else None)
    json_path, csv_path = write_results(args.out, "models", environment(device), rows)
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
