"""The `prunedm` subcommands that run a job: each has its defaults (the config schema) and a
function taking the resolved config and the run's output directory."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from prunedm.cli.config import ConfigError, write_text_atomic
from prunedm.cli.models import load_model, training_images
from prunedm.train import FinetuneConfig

DEFAULTS = {
    "prune": {
        "model": None,
        "seed": 0,
        "method": "channels",  # channels | depth
        "channels": {"importance": "magnitude", "ratio": 0.3, "rounding": "diff-pruning", "data": "digits"},
        "depth": {"keep": None, "every": 2},
    },
    "finetune": {
        "model": None,
        "data": "digits",
        "finetune": {f.name: f.default for f in fields(FinetuneConfig)},
    },
    "sparsify": {"model": None, "seed": 0, "backend": "auto", "verify": True},
    "sample": {"model": None, "seed": 0, "num_samples": 16, "steps": 50, "scheduler": "ddim"},
}


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def run_prune(config: dict, out: Path, resume: bool) -> dict:
    import prunedm

    model = load_model(config["model"], config["seed"])
    if config["method"] == "channels":
        c = config["channels"]
        data = None
        if c["importance"] in ("taylor", "diff-pruning"):
            data = [training_images(c["data"], model)[:32]]
        report = prunedm.prune_channels(
            model, importance=c["importance"], ratio=c["ratio"], data=data, rounding=c["rounding"], seed=config["seed"]
        )
        summary = {
            "params_before": report.params_before, "params_after": report.params_after,
            "macs_before": report.macs_before, "macs_after": report.macs_after,
            "changed_layers": {k: list(map(list, v)) for k, v in report.changed_layers.items()},
        }  # fmt: skip
    elif config["method"] == "depth":
        blocks = getattr(model, "transformer_blocks", None)
        if blocks is None:
            kind = type(model).__name__
            raise ConfigError(f"method=depth needs a transformer with transformer_blocks; {kind} has none")
        keep = config["depth"]["keep"] or prunedm.pruning.keep_every(len(blocks), config["depth"]["every"])
        report = prunedm.prune_depth(model, keep)
        summary = {"kept_blocks": list(keep), "blocks_before": len(blocks)}
    else:
        raise ConfigError(f"method must be channels or depth, got {config['method']!r}")
    prunedm.save_pretrained(model, out / "model")
    _write_json(out / "report.json", summary)
    print(f"pruned model saved to {out / 'model'}")
    return summary


def run_finetune(config: dict, out: Path, resume: bool) -> dict:
    from prunedm import save_pretrained
    from prunedm.train import finetune

    model = load_model(config["model"])
    images = training_images(config["data"], model)
    result = finetune(model, images, out, FinetuneConfig(**config["finetune"]), resume=resume)
    save_pretrained(result.ema_model, out / "model")
    print(f"finetuned (EMA) model saved to {out / 'model'}; final loss {result.final_loss:.4f}")
    return {"final_loss": result.final_loss, "steps": result.steps}


def run_sparsify(config: dict, out: Path, resume: bool) -> dict:
    import prunedm

    model = load_model(config["model"], config["seed"]).eval()
    report = prunedm.sparsify(model, backend=config["backend"], verify=config["verify"])
    prunedm.save_pretrained(model, out / "model")
    write_text_atomic(out / "report.txt", str(report) + "\n")
    summary = {
        "converted": [c.name for c in report.converted],
        "skipped": {s.name: s.reason for s in report.skipped},
        "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
    }  # fmt: skip
    _write_json(out / "report.json", summary)
    print(report)
    return summary


def run_sample(config: dict, out: Path, resume: bool) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler

    from prunedm.eval.sampling import sample_images, save_grid

    if config["scheduler"] not in ("ddim", "ddpm"):
        raise ConfigError(f"scheduler must be ddim or ddpm, got {config['scheduler']!r}")
    model = load_model(config["model"], config["seed"]).eval()
    scheduler = (DDIMScheduler if config["scheduler"] == "ddim" else DDPMScheduler)(num_train_timesteps=1000)
    images = sample_images(model, scheduler, config["num_samples"], config["steps"], seed=config["seed"])
    save_grid(images, out / "samples.png")
    from safetensors.torch import save_file

    save_file({"images": images.contiguous()}, str(out / "samples.safetensors"))
    print(f"wrote {out / 'samples.png'}")
    return {"num_samples": int(images.shape[0])}


RUNNERS = {"prune": run_prune, "finetune": run_finetune, "sparsify": run_sparsify, "sample": run_sample}
