"""`prunedm demo`: the whole pipeline on the shipped digits DDPM, stage by stage into one output dir
(prune, learn 2:4 masks, finetune keeping them, sparsify, sample, eval, bench), then report.md.

Each stage runs a job runner of prunedm.cli.commands in its own subdirectory and marks it finished
with stage.json, so `prunedm demo --resume` skips finished stages and continues an interrupted one."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import prunedm
from prunedm import ops
from prunedm._atomic import write_text_atomic
from prunedm.cli.config import merge_config, prepare_out_dir
from prunedm.cli.schema import DEFAULTS, DEMO_DEFAULTS, validate_config  # noqa: F401  (DEMO_DEFAULTS: re-exported)
from prunedm.measure import layer_macs, time_ms

# `prunedm demo --quick`: every stage, a few steps each (tests; about half a minute on 2 CPU cores). These
# replace the defaults only: a --config file, key=value overrides and flags still win over them.
QUICK_OVERRIDES = [
    "pack_check=false",
    "learn_mask.steps=1",
    "learn_mask.batch_size=4",
    "finetune.steps=1",
    "finetune.batch_size=4",
    "sample.num_samples=16",
    "sample.steps=1",
    "bench.batch_size=4",
    "bench.rounds=1",
    "bench.repeats=1",
]
STAGE_DONE = "stage.json"

# Linear layers of one DiT-XL/2 block (hidden 1152, MLP 4608): (name, out_features, in_features).
DIT_XL_BLOCK_LINEARS = [
    ("attn.to_qkv", 3 * 1152, 1152),
    ("attn.to_out", 1152, 1152),
    ("ff.net.0.proj", 4608, 1152),
    ("ff.net.2", 1152, 4608),
]


def pack_check(device: torch.device, seed: int = 0) -> dict:
    """Prune DiT-XL/2-shaped fp16 weights to 2:4, pack them, and prove the packing exact (round trip,
    and byte-identical to the reference layout); on a GPU also multiply through torch's sparse kernels."""
    gen = torch.Generator().manual_seed(seed)
    layers, total_dense, total_packed = [], 0, 0
    for name, out_features, in_features in DIT_XL_BLOCK_LINEARS:
        weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(device, torch.float16)
        pruned = weight * ops.nm_mask(weight)
        values, meta = ops.compress_2to4(pruned)
        if not torch.equal(ops.decompress_2to4(values, meta), pruned):
            raise RuntimeError(f"{name}: decompress(compress(w)) differs from w")
        reference_values, reference_meta = ops.compress_2to4(pruned.cpu(), backend="reference")
        if not (torch.equal(values.cpu(), reference_values) and torch.equal(meta.cpu(), reference_meta)):
            raise RuntimeError(f"{name}: packed bytes differ from the reference")
        dense_bytes = weight.numel() * weight.element_size()
        packed_bytes = values.numel() * values.element_size() + meta.numel() * meta.element_size()
        layer = {"layer": name, "shape": [out_features, in_features], "packed_ratio": packed_bytes / dense_bytes}
        if device.type == "cuda":
            x = torch.randn(in_features, 64, generator=gen).to(device, torch.float16)
            diff = torch.mm(ops.to_semi_structured(pruned), x) - pruned @ x
            layer["sparse_mm_max_abs_diff"] = float(diff.abs().max())
        layers.append(layer)
        total_dense += dense_bytes
        total_packed += packed_bytes
    return {"layers": layers, "dense_bytes": total_dense, "packed_bytes": total_packed, "exact": True}


def _stage_configs(config: dict, out: Path, device: torch.device) -> list[tuple[str, str, str, dict]]:
    """(stage, command, what it does, the command's config) for every job stage, in order."""
    seed, gpu = config["seed"], device.type == "cuda"
    # Sparse tensor cores run fp16/bf16; on a CPU the 2:4 layers keep fp32 (dense math on packed weights).
    dtype = "float16" if gpu else "float32"
    lm, ft, sample = config["learn_mask"], config["finetune"], config["sample"]
    finetune = {
        "steps": ft["steps"], "batch_size": ft["batch_size"], "lr": ft["lr"], "ema_decay": ft["ema_decay"],
        "seed": seed, "progress": False,
        "checkpoint_every": max(1, ft["steps"] // 2), "log_every": max(1, ft["steps"] // 50),
        "warmup_steps": min(10, ft["steps"] // 10),
    }  # fmt: skip
    if "keep_sparsity" in DEFAULTS["finetune"]["finetune"]:
        finetune["keep_sparsity"] = True  # keep the learned 2:4 zero pattern while finetuning
    sampling = {"num_samples": sample["num_samples"], "steps": sample["steps"], "scheduler": sample["scheduler"],
                "seed": seed, "device": config["device"], "dtype": dtype}  # fmt: skip
    evaluation = {"features": config["eval"]["features"], "inception_dir": config["eval"]["inception_dir"]}
    return [
        ("prune", "prune", f"channels, {config['prune']['importance']} importance, ratio {config['prune']['ratio']}",
         {"model": config["model"], "seed": seed, "device": config["device"],
          "channels": {"importance": config["prune"]["importance"], "ratio": config["prune"]["ratio"]}}),
        ("learn-mask", "learn-mask", f"2:4 masks, {lm['method']}, {lm['steps']} steps",
         {"model": str(out / "prune" / "model"), "seed": seed, "device": config["device"], "method": lm["method"],
          "steps": lm["steps"], "batch_size": lm["batch_size"], "checkpoint_every": max(1, lm["steps"] // 2),
          **({lm["method"]: {"preset": lm["preset"]}} if lm["method"] != "magnitude" else {})}),
        ("finetune", "finetune", f"{ft['steps']} steps, keeping the 2:4 pattern",
         {"model": str(out / "learn-mask" / "model"), "device": config["device"], "finetune": finetune}),
        ("sparsify", "sparsify", "pack the 2:4 layers",
         {"model": str(out / "finetune" / "model"), "masks": str(out / "learn-mask" / "masks.safetensors"),
          "seed": seed, "device": config["device"], "dtype": dtype}),
        ("sample-dense", "sample", f"{sample['num_samples']} samples from the dense model, {sample['steps']} steps",
         {"model": config["model"], **sampling, "dtype": "float32"}),
        ("sample", "sample", f"{sample['num_samples']} samples from the pruned 2:4 model",
         {"model": str(out / "sparsify" / "model"), **sampling}),
        ("eval-dense", "eval", "FID and classifier accuracy of the dense samples",
         {"samples": str(out / "sample-dense" / "samples.safetensors"), **evaluation}),
        ("eval", "eval", "FID and classifier accuracy of the pruned samples",
         {"samples": str(out / "sample" / "samples.safetensors"), **evaluation}),
    ]  # fmt: skip


def _run_stage(out: Path, index: int, total: int, name: str, what: str, work) -> dict:
    """Run work(stage_dir) -> dict unless stage.json says it finished; logs to stage_dir/log.txt."""
    stage_dir = out / name
    done = stage_dir / STAGE_DONE
    if done.is_file():
        record = json.loads(done.read_text())
        print(f"[{index}/{total}] {name}: finished in an earlier run ({record['seconds']:.1f} s), skipped", flush=True)
        return record
    print(f"[{index}/{total}] {name}: {what} ...", end="", flush=True)
    start = time.perf_counter()
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log):
        result = work(stage_dir)
    record = {"stage": name, "seconds": time.perf_counter() - start, "result": result}
    write_text_atomic(done, json.dumps(record, indent=1, default=str) + "\n")
    print(f" {record['seconds']:.1f} s", flush=True)
    return record


def _job(runner, command: str, stage_config: dict):
    def work(stage_dir: Path) -> dict:
        config = validate_config(command, merge_config(DEFAULTS[command], stage_config))
        prepare_out_dir(stage_dir, config, resume=True)  # an interrupted stage continues from its checkpoints
        return runner(config, stage_dir, True)

    return work


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bench_models(config: dict, out: Path, device: torch.device, converted: list[str]) -> dict:
    """Dense vs pruned 2:4: params, non-zero weights, MACs per sample, bytes, and forward latency
    (median of interleaved rounds, so load on a shared machine hits both alike)."""
    from prunedm.cli.models import load_model
    from prunedm.pruning import count_macs_and_params
    from prunedm.pruning.channels import default_example_inputs

    dense = load_model(config["model"]).eval()
    pruned = load_model(str(out / "finetune" / "model")).eval()  # the structure, before packing
    final = load_model(str(out / "sparsify" / "model")).eval()
    inputs = default_example_inputs(dense)
    dense_macs, dense_params = count_macs_and_params(dense, inputs)
    pruned_macs, pruned_params = count_macs_and_params(pruned, inputs)
    converted_macs = sum(layer_macs(pruned, inputs, set(converted)).values())
    nonzero = sum(int((p != 0).sum()) for p in pruned.parameters())
    batch, gen = config["bench"]["batch_size"], torch.Generator().manual_seed(0)
    sample = torch.randn(batch, dense.config.in_channels, dense.config.sample_size, dense.config.sample_size,
                         generator=gen)  # fmt: skip
    timestep = torch.full((batch,), 500, dtype=torch.long)
    gpu = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if gpu else contextlib.nullcontext()
    timings = {"dense": [], "pruned": []}
    models = {"dense": dense.to(device), "pruned": final.to(device)}
    x, t = sample.to(device), timestep.to(device)
    with torch.inference_mode(), autocast:
        for model in models.values():
            model(x, t)  # warm-up
        for _ in range(config["bench"]["rounds"]):
            for key, model in models.items():
                timing = time_ms(lambda m=model: m(x, t), device, repeats=config["bench"]["repeats"], warmup=False)
                timings[key].append(timing["median_ms"])
    ratios = [d / p for d, p in zip(timings["dense"], timings["pruned"])]
    where = torch.cuda.get_device_name(device) if gpu else f"cpu, {torch.get_num_threads()} threads"
    return {
        "device": where, "device_type": device.type, "batch_size": batch,
        "dtype": "float16 (autocast)" if gpu else "float32",
        "dense": {"params": dense_params, "nonzero_weights": sum(int((p != 0).sum()) for p in dense.parameters()),
                  "macs_per_sample": dense_macs, "bytes": _model_bytes(dense),
                  "latency_ms": statistics.median(timings["dense"])},
        "pruned": {"params": pruned_params, "nonzero_weights": nonzero, "macs_per_sample": pruned_macs,
                   "macs_per_sample_2to4": pruned_macs - converted_macs // 2, "bytes": _model_bytes(final),
                   "latency_ms": statistics.median(timings["pruned"])},
        "speedup_vs_dense": statistics.median(ratios), "rounds": len(ratios),
    }  # fmt: skip


def run_pipeline(config: dict, out: Path, device: torch.device, runners: dict) -> dict:
    """Run every stage of the demo into `out` (finished stages are skipped) and write out/report.md.

    `runners` maps a command to its runner (cli.commands.RUNNERS): passed in, as commands imports this module."""
    from prunedm.cli.report import write_report

    torch.manual_seed(config["seed"])
    stages = _stage_configs(config, out, device)
    total = len(stages) + 1 + int(bool(config["pack_check"]))
    started = time.perf_counter()
    print(f"prunedm {prunedm.__version__} demo on {device}: {total} stages into {out}", flush=True)
    records, index = {}, 0
    if config["pack_check"]:
        index += 1
        what = "2:4-pack DiT-XL/2-shaped weights, check the bytes"
        records["pack-check"] = _run_stage(out, index, total, "pack-check", what,
                                           lambda _: pack_check(device, config["seed"]))  # fmt: skip
    for name, command, what, stage_config in stages:
        index += 1
        records[name] = _run_stage(out, index, total, name, what, _job(runners[command], command, stage_config))
    converted = records["sparsify"]["result"]["converted"]
    index += 1
    records["bench"] = _run_stage(out, index, total, "bench", f"latency, params, MACs, bytes vs dense on {device}",
                                  lambda _: bench_models(config, out, device, converted))  # fmt: skip
    report = write_report(out, config, records)
    elapsed = time.perf_counter() - started
    bench = records["bench"]["result"]
    dense_eval, pruned_eval = records["eval-dense"]["result"], records["eval"]["result"]
    print(
        f"done in {elapsed:.0f} s. FID {dense_eval['fid']:.2f} dense -> {pruned_eval['fid']:.2f} pruned 2:4; "
        f"params {bench['dense']['params'] / 1e3:.0f}k -> {bench['pruned']['params'] / 1e3:.0f}k; "
        f"{bench['speedup_vs_dense']:.2f}x vs dense ({bench['device']})\nreport: {report}",
        flush=True,
    )
    return {"report": str(report), "seconds": elapsed}
