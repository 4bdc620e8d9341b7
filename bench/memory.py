"""Peak memory per model parameter of one MaskLLM and one MaskPro mask-learning step on CPU, side by side in one
run: our single-process path (what DDP holds on every rank), our FSDP path (parallel: fsdp) at 1, 2 and 4 gloo
ranks, each in fp32 and in mixed precision (bf16: the frozen model stored and run in bf16, logits fp32), the
official MaskLLM formulation (soft masks as softmax((logits + Gumbel noise) / tau) @ patterns in plain torch ops,
so autograd keeps the [groups, 6] softmax and noise), and "composed" / "composed-fsdp": our steps before their
transient savings (MaskLLM: logits * scale and W * M kept per layer until the backward; MaskPro: every layer's
gathered mask drawn before the forward); with a projection for SDXL, SD3-medium and Flux at 8 ranks. Target
(issue 18): the MaskLLM mask state (logits, their gradient and Adam's two moments) at 8 ranks at most 3 bytes per
parameter per rank. MaskPro's (official preset: one logit per weight, its gradient, the initial mask; plain SGD
keeps no state) is measured beside it.

Peak = the tensors alive before the step (model, logits and their gradients, optimizer state) + the step transient:
the highest running sum of the CPU allocations minus frees of the measured step (torch.profiler's memory events,
with addresses; the warm-up step before it is profiled too, so that frees of what it left are counted). "top"
names the ops whose allocations of the measured step are alive at that peak (bytes per parameter).

    python -m bench.memory [--out DIR] [--width 256] [--blocks 4] [--ranks 1 2 4]"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from prunedm import ops
from prunedm._atomic import write_text_atomic
from prunedm.masks import MaskLLMLearner, MaskProLearner
from prunedm.parallel import fsdp

from .common import environment

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "cpu"
TARGET_MASK_STATE_BYTES = 3.0
PROJECTION_RANKS = 8
# Parameters of the models the projection is for (UNet / transformer only).
MODELS = {"SDXL UNet": 2.6e9, "SD3-medium MMDiT": 2.0e9, "Flux.1 transformer": 12.0e9}
METHODS = ("maskllm", "maskpro")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
MEASURED = "bench.memory.measured_step"


class BenchTransformer(nn.Module):
    """A transformer-shaped stack of MLP blocks (where diffusers keeps them: transformer_blocks)."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(width, width)
        self.transformer_blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(blocks)
        )
        self.proj_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.transformer_blocks:
            h = h + block(h)
        return self.proj_out(h)


class Composed(MaskLLMLearner):
    """Our MaskLLM step as it was before its transient savings: the sample op on logits * scale, whose product
    autograd keeps (the op saves its input) until the backward, and each layer's W * M kept for the backward
    (no prunedm.masks.recompute)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for hook in self._hooks.values():
            hook.recompute = None

    def _sample_one(self, index: int, name: str, tau: float, scale: float) -> torch.Tensor:
        logits, seed = self.logits[name] * scale, self._sample_seed(index)
        return fsdp.sample_rows(
            ops.gumbel_pattern_sample, logits, self.n, self.m, tau, self.hard, seed, backend=self.backend
        )


class OfficialFormulation(Composed):
    """MaskLLM's soft masks as its official code computes them, in each layer's forward: Gumbel noise from
    torch.rand, a softmax over the C(m, n) patterns and a matmul with the pattern table, each kept by autograd (and
    each layer's W * M, as Composed)."""

    def _sample_one(self, index: int, name: str, tau: float, scale: float) -> torch.Tensor:
        logits = self.logits[name]
        patterns = ops.nm_patterns(self.n, self.m, dtype=torch.float32)
        noise = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-10, 1 - 1e-7)))
        soft = torch.softmax((logits * scale + noise) / tau, dim=-1)
        return (soft @ patterns).reshape(logits.shape[0], -1)


class ComposedMaskPro(MaskProLearner):
    """Our MaskPro step as it was before its transient saving: every layer's mask drawn (and, sharded, gathered)
    before the forward, all of them alive through it, rather than each when its layer runs."""

    def _sample_when_run(self, draw: int, own: dict) -> None:
        own.update(self._own_rows(self.sample(draw)))


BEFORE = {"maskllm": Composed, "maskpro": ComposedMaskPro}


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _batch(width: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(8, width, generator=g), torch.randn(8, width, generator=g)


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]


def _owner(ops_by_start: list[dict], ts: float) -> str:
    """The innermost op (shortest span) of a trace whose span holds the time ts."""
    best = None
    for op in ops_by_start:
        if op["ts"] > ts:
            break
        if ts <= op["ts"] + op["dur"] and (best is None or op["dur"] <= best["dur"]):
            best = op
    return best["name"] if best is not None else "(outside ops)"


def step_memory(warmup, step) -> tuple[int, dict[str, int]]:
    """(transient bytes, {op: bytes alive at the peak}) of step(), run after warmup() with both profiled: the highest
    running sum of CPU allocations minus frees during step() above the sum at its start, from the profiler's
    memory events (each with its address, so that what is alive at the peak is known)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warmup()
        with record_function(MEASURED):
            step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    start = min(e["ts"] for e in events if e.get("name") == MEASURED and e.get("ph") == "X")
    ops_by_start = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    running, base, peak, alive, at_peak = 0, None, 0, {}, {}
    for event in memory:
        if base is None and event["ts"] >= start:
            base = peak = running
        size, address = int(event["args"]["Bytes"]), event["args"]["Addr"]
        running += size
        if size > 0:
            alive[address] = (size, event["ts"])
        else:
            alive.pop(address, None)
        if base is not None and running > peak:
            peak, at_peak = running, dict(alive)
    top: collections.Counter = collections.Counter()
    for size, ts in at_peak.values():
        if ts >= start:
            top[_owner(ops_by_start, ts)] += size
    return (0 if base is None else peak - base), dict(top.most_common(4))


def measure(kind: str, width: int, blocks: int, rank: int = 0, method: str = "maskllm", precision: str = "fp32"
            ) -> dict:  # fmt: skip
    """One row: bytes per model parameter of a mask-learning step (official preset; MaskLLM without its
    regulariser) on this rank, in fp32 or bf16 (mixed precision)."""
    torch.manual_seed(0)
    model = BenchTransformer(width, blocks)
    params = sum(p.numel() for p in model.parameters())
    dtype = PRECISIONS[precision]
    sharded = kind.endswith("fsdp")  # fsdp, composed-fsdp
    if kind == "official":
        learner_class = OfficialFormulation
    elif kind.startswith("composed"):
        learner_class = BEFORE[method]
    else:
        learner_class = MaskProLearner if method == "maskpro" else MaskLLMLearner
    if method == "maskpro":
        learner = learner_class(model, _loss, preset="official", compute_dtype=dtype)
    else:
        learner = learner_class(model, _loss, preset="official", total_steps=10, weight_reg=0.0, compute_dtype=dtype)
    if sharded:
        learner.shard()
    batch = _batch(width, rank)
    logits = list(learner.logits.values())

    def warmup() -> None:  # the optimizer's state and the logits' gradients exist from here on
        learner.step(batch)
        state.update({
            "model": _local_bytes(model.parameters()),
            "logits": _local_bytes(logits),
            "gradients": _local_bytes(t.grad for t in logits if t.grad is not None),
            "optimizer": _local_bytes(_optimizer_tensors(learner.mask_optimizer)),
            "initial": _local_bytes(getattr(learner, "initial", {}).values()),  # MaskPro's initial masks
        })  # fmt: skip

    state: dict[str, int] = {}
    transient, top = step_memory(warmup, lambda: learner.step(batch))
    mask_state = state["logits"] * 2 + state["optimizer"] + state["initial"]  # logits, their gradient, the rest
    world = fsdp.world_size() if sharded else 1
    return {
        "method": method,
        "path": kind,
        "precision": precision,
        "ranks": world,
        "model_params": params,
        "logits_per_param": sum(t.numel() for t in logits) / params,
        "model_bytes_per_param": state["model"] / params,
        "mask_state_bytes_per_param": mask_state / params,
        "peak_bytes_per_param": (sum(state.values()) + transient) / params,
        "step_transient_bytes_per_param": transient / params,
        "top": {op: size / params for op, size in top.items()},
    }


def _fsdp_worker(rank: int, world: int, width: int, blocks: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = [measure("fsdp", width, blocks, rank, m, p) for m in METHODS for p in PRECISIONS]
        rows += [measure("composed-fsdp", width, blocks, rank, m) for m in METHODS]  # the step before, fp32
        if rank == 0:
            write_text_atomic(out, json.dumps(rows))
    finally:
        dist.destroy_process_group()


def measure_fsdp(world: int, width: int, blocks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        mp.spawn(_fsdp_worker, args=(world, width, blocks, f"{tmp}/store", str(out)), nprocs=world, join=True)
        return json.loads(out.read_text())


def fit_per_rank(rows: list[dict], key: str) -> tuple[float, float]:
    """(a, b) of key = a + b / ranks, least squares over the FSDP rows: a is what every rank holds whole."""
    xs = [1.0 / r["ranks"] for r in rows]
    ys = [r[key] for r in rows]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
    return mean_y - b * mean_x, b


def projection(rows: list[dict], ranks: int = PROJECTION_RANKS, method: str = "maskllm", precision: str = "fp32"
               ) -> list[dict]:  # fmt: skip
    """GB per GPU for each model at `ranks`: `method`'s mask state and step peak in `precision` (each fitted
    a + b / ranks over the FSDP rows; the peak as measured on the bench model, activations of a small batch
    included), and the same under DDP (the single-process row: every rank whole)."""
    rows = [r for r in rows if (r.get("method", "maskllm"), r.get("precision", "fp32")) == (method, precision)]
    fsdp_rows = [r for r in rows if r["path"] == "fsdp"]
    single = next(r for r in rows if r["path"] == "single")
    fits = {key: fit_per_rank(fsdp_rows, f"{key}_bytes_per_param") for key in ("mask_state", "peak")}
    per_param = {key: a + b / ranks for key, (a, b) in fits.items()}
    out = []
    for model, params in MODELS.items():
        out.append({
            "method": method, "precision": precision, "model": model, "params": params, "ranks": ranks,
            "fsdp_mask_state_bytes_per_param_per_rank": per_param["mask_state"],
            "fsdp_mask_state_gb_per_rank": per_param["mask_state"] * params / 1e9,
            "fsdp_peak_bytes_per_param_per_rank": per_param["peak"],
            "fsdp_peak_gb_per_rank": per_param["peak"] * params / 1e9,
            "ddp_mask_state_gb_per_rank": single["mask_state_bytes_per_param"] * params / 1e9,
            "ddp_peak_gb_per_rank": single["peak_bytes_per_param"] * params / 1e9,
        })  # fmt: skip
    return out


def _top(row: dict) -> str:
    return ", ".join(f"{op} {size:.2f}" for op, size in row.get("top", {}).items())


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# MaskLLM and MaskPro mask-learning memory (CPU)",
        "",
        f"{env['date']}, commit {env['commit']}, torch {env['torch']}; "
        f"model: {result['config']['blocks']} MLP blocks of width {result['config']['width']} "
        f"({result['rows'][0]['model_params']} parameters), batch 8, official presets (MaskLLM: soft masks, Adam; "
        "MaskPro: one sample, SGD); bf16: the frozen model stored and run in bf16, logits and reductions fp32.",
        "",
        "| method | path | precision | ranks | mask state B/param/rank | model B/param/rank | peak B/param/rank "
        "| step transient B/param | alive at the peak (op B/param) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r.get('method', 'maskllm')} | {r['path']} | {r.get('precision', 'fp32')} | {r['ranks']} "
            f"| {r['mask_state_bytes_per_param']:.2f} | {r['model_bytes_per_param']:.2f} "
            f"| {r['peak_bytes_per_param']:.2f} | {r['step_transient_bytes_per_param']:.2f} | {_top(r)} |"
        )
    lines += [
        "",
        f"Projection at {PROJECTION_RANKS} ranks (mask state and step peak fitted as a + b / ranks over the FSDP rows; "
        f"target <= {TARGET_MASK_STATE_BYTES} B/param/rank for MaskLLM's mask state; the peak holds the bench's "
        "activations, which scale with batch and resolution, not with parameters):",
        "",
        "| method | precision | model | params | FSDP mask state B/param/rank | FSDP mask state GB/GPU "
        "| FSDP peak B/param/rank | FSDP peak GB/GPU | DDP mask state GB/GPU | DDP peak GB/GPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["projection"]:
        lines.append(
            f"| {p['method']} | {p['precision']} | {p['model']} | {p['params'] / 1e9:.1f}B "
            f"| {p['fsdp_mask_state_bytes_per_param_per_rank']:.2f} | {p['fsdp_mask_state_gb_per_rank']:.1f} "
            f"| {p['fsdp_peak_bytes_per_param_per_rank']:.2f} | {p['fsdp_peak_gb_per_rank']:.1f} "
            f"| {p['ddp_mask_state_gb_per_rank']:.1f} | {p['ddp_peak_gb_per_rank']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run(width: int, blocks: int, ranks: list[int]) -> dict:
    rows = [measure("official", width, blocks), *(measure("composed", width, blocks, method=m) for m in METHODS)]
    rows += [measure("single", width, blocks, method=m, precision=p) for m in METHODS for p in PRECISIONS]
    rows += [row for world in ranks for row in measure_fsdp(world, width, blocks)]
    table = [line for m in METHODS for p in PRECISIONS for line in projection(rows, method=m, precision=p)]
    return {"config": {"width": width, "blocks": blocks, "ranks": ranks}, "rows": rows, "projection": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for memory-<date>.json and .md")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"environment": environment(torch.device("cpu")), **run(args.width, args.blocks, args.ranks)}
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    write_text_atomic(out / f"memory-{date}.json", json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    write_text_atomic(out / f"memory-{date}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
