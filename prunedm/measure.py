"""How fast and how much: the one latency timer (time_ms; batch_ms, the clock under it and under the sparse
layers' autotune) and the one per-layer MAC count, for the CLI's demo and the benchmark harness (bench/).
Whole-model MAC and parameter totals are torch-pruning's (prunedm.pruning.count_macs_and_params)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Collection, Mapping

import torch
from torch import nn

__all__ = ["batch_ms", "layer_macs", "time_ms"]


def _quantiles(times_ms: list[float], median: float) -> dict:
    times = sorted(times_ms)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": median, "q20_ms": pick(0.2), "q80_ms": pick(0.8)}


def batch_ms(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Wall time of `calls` back-to-back fn() calls in ms: on CUDA between two events recorded around them
    (one sync, at the end), elsewhere perf_counter."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    min_run_time: float = 0.2,
    *,
    repeats: int | None = None,
    warmup: bool = True,
) -> dict:
    """Median and 20/80% quantiles of fn's latency in ms ({"median_ms", "q20_ms", "q80_ms"}), after one
    warm-up call (warmup=False: none).

    repeats None: CUDA through triton's do_bench (its own warm-up, L2 flushed); CPU through
    torch.utils.benchmark's blocked_autorange for at least min_run_time seconds, at the process's thread
    count. repeats n: exactly n timed calls (batch_ms of one call, the device synchronized before each): for
    calls too long to autorange, such as a whole model's forward or sampling loop."""
    if repeats is not None and (not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1):
        raise ValueError(f"time_ms: repeats must be a positive integer or None, got {repeats!r}")
    if warmup:
        fn()
    if repeats is not None:
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(batch_ms(fn, device))
        return _quantiles(times, statistics.median(times))
    if device.type == "cuda":
        import triton.testing

        median, q20, q80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "q20_ms": q20, "q80_ms": q80}
    import torch.utils.benchmark as benchmark

    # Timer runs at 1 thread unless told; time at the process's thread count (what a benchmark records).
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return _quantiles([t * 1e3 for t in measurement.times], measurement.median * 1e3)


def layer_macs(model: nn.Module, inputs: Mapping, names: Collection[str] | None = None) -> dict[str, int]:
    """MACs of one sample in each nn.Linear / nn.Conv2d (only those in `names`, if given), by module name:
    output elements x (in_features, or Cin / groups x kh x kw), summed over the calls of one forward,
    measured with forward hooks on model(**inputs) with every tensor input cut to its first row."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module, args, output):
            per_output = module.weight[0].numel()  # in_features; Cin / groups * kh * kw
            macs[name] = macs.get(name, 0) + output.numel() * per_output

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and (names is None or name in names)
    ]
    one = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
    try:
        with torch.inference_mode():
            model(**one)
    finally:
        for handle in handles:
            handle.remove()
    return macs
