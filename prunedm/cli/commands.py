"""The `prunedm` subcommands that run a job: each has its defaults (the config schema) and a
function taking the resolved config and the run's output directory."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

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
    "learn-mask": {
        "model": None,
        "data": "digits",
        "seed": 0,
        "method": "maskllm",  # maskllm | maskpro | magnitude
        "steps": 100,
        "batch_size": 16,
        "checkpoint_every": 25,
        "maskllm": {"tau": [4.0, 0.05], "scale": [100.0, 500.0], "weight_reg": 0.0},
        "maskpro": {"logit_init": 10.0, "mask_lr": 50.0, "model_lr": 0.0},
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


def _denoising_loss(scheduler):
    """loss(model, images): the noise-prediction loss at random timesteps (the global RNG, which the
    mask learners replay when they compare masks on the same draw)."""
    from prunedm.train.finetune import diffusion_target, predict

    def loss(model, images):
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],))
        noisy = scheduler.add_noise(images, noise, timesteps)
        target = diffusion_target(scheduler, images, noise, timesteps)
        return torch.nn.functional.mse_loss(predict(model, noisy, timesteps, {}), target)

    return loss


def run_learn_mask(config: dict, out: Path, resume: bool) -> dict:
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from prunedm import masks as pm
    from prunedm import save_pretrained
    from prunedm.train.finetune import StepSampler

    method = config["method"]
    if method not in ("maskllm", "maskpro", "magnitude"):
        raise ConfigError(f"method must be maskllm, maskpro or magnitude, got {method!r}")
    model = load_model(config["model"], config["seed"])
    torch.manual_seed(config["seed"])
    if method == "magnitude":
        targets, _ = pm.find_targets(model)
        found = pm.magnitude_masks(targets)
        pm.apply_masks(model, found)
    else:
        images = training_images(config["data"], model)
        loss = _denoising_loss(DDPMScheduler(num_train_timesteps=1000))
        if method == "maskllm":
            c = config["maskllm"]
            learner = pm.MaskLLMLearner(model, loss, tau=tuple(c["tau"]), scale=tuple(c["scale"]),
                                        weight_reg=c["weight_reg"], total_steps=config["steps"])  # fmt: skip
        else:
            c = config["maskpro"]
            learner = pm.MaskProLearner(model, loss, logit_init=c["logit_init"], mask_lr=c["mask_lr"],
                                        model_lr=c["model_lr"])  # fmt: skip
        state = out / "learner.safetensors"
        if resume and state.exists():
            learner.load(state)
        sampler = StepSampler(len(images), config["batch_size"], config["seed"])
        with open(out / "metrics.jsonl", "a") as log:
            for step in tqdm(range(learner.step_count, config["steps"]), desc="learn-mask"):
                info = learner.step(images[sampler.indices(step)])
                log.write(json.dumps({"step": step + 1, **{k: v for k, v in info.items() if _scalar(v)}}) + "\n")
                if (step + 1) % config["checkpoint_every"] == 0 or step + 1 == config["steps"]:
                    learner.save(state.with_suffix(".tmp"))
                    state.with_suffix(".tmp").replace(state)
        found = learner.finalize()
    tmp = out / ".masks.safetensors.tmp"
    save_file({name: mask.contiguous() for name, mask in found.items()}, str(tmp))
    tmp.replace(out / "masks.safetensors")
    save_pretrained(model, out / "model")
    print(f"{len(found)} 2:4 masks in {out / 'masks.safetensors'}; masked model in {out / 'model'}")
    return {"masks": len(found)}


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool))


RUNNERS = {
    "learn-mask": run_learn_mask,
    "prune": run_prune,
    "finetune": run_finetune,
    "sparsify": run_sparsify,
    "sample": run_sample,
}
