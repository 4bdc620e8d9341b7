"""Peak memory per model parameter of one MaskLLM and one MaskPro mask-learning step on CPU, side by side in one
run: our single-process path (what DDP holds on every rank), our FSDP path (parallel: fsdp) at 1, 2 and 4 gloo
ranks, and the official MaskLLM formulation (soft masks as softmax((logits + Gumbel noise) / tau) @ patterns in plain
torch ops, so autograd keeps the [groups, 6] softmax and noise); with a projection for SDXL, SD3-medium and
Flux at 8 ranks. Target (issue 18): the MaskLLM mask state (logits, their gradient and Adam's two moments)
at 8 ranks at most 3 bytes per parameter per rank. MaskPro's (official preset: one logit per weight, its
gradient, the initial mask; plain SGD keeps no state) is measured beside it.

Peak = the tensors alive before the step (model, logits, optimizer state) + the highest sum of CPU
allocations minus frees during the step (torch.profiler's memory events), on the step after a warm-up one.

    python -m bench.memory [--out DIR] [--width 256] [--blocks 4] [--ranks 1 2 4]"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.profiler import ProfilerActivity, profile

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


class OfficialFormulation(MaskLLMLearner):
    """MaskLLM's soft masks as its official code computes them, in each layer's forward: Gumbel noise from
    torch.rand, a softmax over the C(m, n) patterns and a matmul with the pattern table, each kept by autograd."""

    def _sample_one(self, index: int, name: str, tau: float, scale: float) -> torch.Tensor:
        logits = self.logits[name]
        patterns = ops.nm_patterns(self.n, self.m, dtype=torch.float32)
        noise = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-10, 1 - 1e-7)))
        soft = torch.softmax((logits * scale + noise) / tau, dim=-1)
        return (soft @ patterns).reshape(logits.shape[0], -1)


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


def _peak_transient_bytes(fn) -> int:
    """The highest running sum of CPU allocations minus frees while fn runs: torch.profiler's memory records, each
    op's own (self) allocations at its start and the frees outside ops ("[memory]" events), in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def measure(kind: str, width: int, blocks: int, rank: int = 0, method: str = "maskllm") -> dict:
    """One row: bytes per model parameter of a mask-learning step (official preset; MaskLLM without its
    regulariser) on this rank."""
    torch.manual_seed(0)
    model = BenchTransformer(width, blocks)
    params = sum(p.numel() for p in model.parameters())
    if method == "maskpro":
        learner = MaskProLearner(model, _loss, preset="official")
    else:
        learner_class = OfficialFormulation if kind == "official" else MaskLLMLearner
        learner = learner_class(model, _loss, preset="official", total_steps=10, weight_reg=0.0)
    if kind == "fsdp":
        learner.shard()
    batch = _batch(width, rank)
    learner.step(batch)  # warm-up: the optimizer's state exists from here on
    logits = list(learner.logits.values())
    state = {
        "model": _local_bytes(model.parameters()),
        "logits": _local_bytes(logits),
        "optimizer": _local_bytes(_optimizer_tensors(learner.mask_optimizer)),
        "initial": _local_bytes(getattr(learner, "initial", {}).values()),  # MaskPro's initial masks
    }
    transient = _peak_transient_bytes(lambda: learner.step(batch))
    mask_state = state["logits"] * 2 + state["optimizer"] + state["initial"]  # logits, their gradient, the rest
    world = fsdp.world_size() if kind == "fsdp" else 1
    return {
        "method": method,
        "path": kind,
        "ranks": world,
        "model_params": params,
        "logits_per_param": sum(t.numel() for t in logits) / params,
        "model_bytes_per_param": state["model"] / params,
        "mask_state_bytes_per_param": mask_state / params,
        "peak_bytes_per_param": (sum(state.values()) + transient) / params,
        "step_transient_bytes_per_param": transient / params,
    }


def _fsdp_worker(rank: int, world: int, width: int, blocks: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = [measure("fsdp", width, blocks, rank, method) for method in METHODS]
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


def projection(rows: list[dict], ranks: int = PROJECTION_RANKS, method: str = "maskllm") -> list[dict]:
    """GB per GPU for each model at `ranks`: `method`'s mask state (fitted a + b / ranks), the bf16 model sharded,
    and the same mask state under DDP (every rank whole)."""
    rows = [r for r in rows if r.get("method", "maskllm") == method]
    fsdp_rows = [r for r in rows if r["path"] == "fsdp"]
    a, b = fit_per_rank(fsdp_rows, "mask_state_bytes_per_param")
    single = next(r for r in rows if r["path"] == "single")
    per_param = a + b / ranks
    out = []
    for model, params in MODELS.items():
        out.append({
            "method": method, "model": model, "params": params, "ranks": ranks,
            "fsdp_mask_state_bytes_per_param_per_rank": per_param,
            "fsdp_mask_state_gb_per_rank": per_param * params / 1e9,
            "fsdp_bf16_model_gb_per_rank": 2 * params / ranks / 1e9,
            "ddp_mask_state_gb_per_rank": single["mask_state_bytes_per_param"] * params / 1e9,
            "ddp_bf16_model_gb_per_rank": 2 * params / 1e9,
        })  # fmt: skip
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# MaskLLM and MaskPro mask-learning memory (CPU)",
        "",
        f"{env['date']}, commit {env['commit']}, torch {env['torch']}; "
        f"model: {result['config']['blocks']} MLP blocks of width {result['config']['width']} "
        f"({result['rows'][0]['model_params']} parameters), fp32, official presets (MaskLLM: soft masks, Adam; "
        "MaskPro: one sample, SGD).",
        "",
        "| method | path | ranks | mask state B/param/rank | model B/param/rank | peak B/param/rank "
        "| step transient B/param |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r.get('method', 'maskllm')} | {r['path']} | {r['ranks']} "
            f"| {r['mask_state_bytes_per_param']:.2f} | {r['model_bytes_per_param']:.2f} "
            f"| {r['peak_bytes_per_param']:.2f} | {r['step_transient_bytes_per_param']:.2f} |"
        )
    lines += [
        "",
        f"Projection at {PROJECTION_RANKS} ranks (mask state fitted as a + b / ranks over the FSDP rows; "
        f"target <= {TARGET_MASK_STATE_BYTES} B/param/rank):",
        "",
        "| method | model | params | FSDP mask state B/param/rank | FSDP mask state GB/GPU | FSDP bf16 model GB/GPU "
        "| DDP mask state GB/GPU | DDP bf16 model GB/GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["projection"]:
        lines.append(
            f"| {p.get('method', 'maskllm')} | {p['model']} "
            f"| {p['params'] / 1e9:.1f}B | {p['fsdp_mask_state_bytes_per_param_per_rank']:.2f} "
            f"| {p['fsdp_mask_state_gb_per_rank']:.1f} | {p['fsdp_bf16_model_gb_per_rank']:.1f} "
            f"| {p['ddp_mask_state_gb_per_rank']:.1f} | {p['ddp_bf16_model_gb_per_rank']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run(width: int, blocks: int, ranks: list[int]) -> dict:
    rows = [measure("official", width, blocks), *(measure("single", width, blocks, method=m) for m in METHODS)]
    rows += [row for world in ranks for row in measure_fsdp(world, width, blocks)]
    table = [line for method in METHODS for line in projection(rows, method=method)]
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
