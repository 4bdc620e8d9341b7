"""The `prunedm` subcommands that run a job: each takes the resolved config (defaults and checks in
prunedm.cli.schema) and the run's output directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prunedm._atomic import atomic_file, write_text_atomic
from prunedm.cli.config import ConfigError
from prunedm.cli.models import load_model
from prunedm.cli.pipeline import (
    conditioned_data,
    flow_scheduler,
    latent_space,
    load_conditioning,
    sampling_conditions,
    scheduler_config,
    training_dropout,
    training_scheduler,
)

# The jobs' defaults and the checks of every key live in one table (prunedm.cli.schema).
from prunedm.cli.schema import DEFAULTS, DEVICES, parse_pattern  # noqa: F401  (parse_pattern: re-exported)
from prunedm.train import FinetuneConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Training images the MaskPro report scores the final and the magnitude mask on (the same noise for both).
REPORT_IMAGES = 256

# The job flags --seed/--device/--dtype are shorthands for these config keys (where a job has them).
FLAG_KEYS = {
    "seed": {job: "finetune.seed" if job == "finetune" else "seed" for job in DEFAULTS},
    "device": {job: "device" for job in DEFAULTS},
    "dtype": {job: "dtype" for job, d in DEFAULTS.items() if "dtype" in d},
}


def resolve_device(name: str) -> torch.device:
    """The torch.device a config's device= names: auto (cuda when visible), cpu or cuda."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is visible; use device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype a config's dtype= names."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _to(model, device: torch.device, dtype: torch.dtype | None = None):
    """model.to(device, dtype), skipping what already holds (diffusers warns on every dtype cast)."""
    param = next(model.parameters(), None)
    if param is None:
        return model
    if param.device != device:
        model = model.to(device)
    if dtype is not None and param.dtype != dtype:
        model = model.to(dtype)
    return model


def _autocast(device: torch.device, dtype: torch.dtype):
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def run_prune(config: dict, out: Path, resume: bool) -> dict:
    """prune: channels of a UNet (torch-pruning) or blocks of a DiT; writes model/ and report.json."""
    import prunedm

    device = resolve_device(config["device"])
    model = load_model(config["model"], config["seed"])
    if config["method"] == "depth":  # blocks chosen, or learned by TinyFusion (under torchrun too): prunedm.cli.depth
        from prunedm.cli.depth import run_prune_depth

        return run_prune_depth(config, out, resume, _to(model, device), device)
    if _distributed()[1] > 1:
        raise ConfigError("prune runs in one process; under torchrun only method=depth depth.learn=tinyfusion does")
    if config["method"] == "channels":
        c = config["channels"]
        model = _to(model, device)
        data = None
        if c["importance"] in ("taylor", "diff-pruning"):  # the gradient pass: images with their conditioning
            _, images = conditioned_data({**config, "data": c["data"], "cond_dropout": 0.0}, model, device)
            batch = images[:32]
            data = [{k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)]
        report = prunedm.prune_channels(
            model, importance=c["importance"], ratio=c["ratio"], data=data, rounding=c["rounding"],
            round_to=c["round_to"], max_timesteps=c["max_timesteps"], seed=config["seed"],
            scheduler=training_scheduler(config),
        )  # fmt: skip
        summary = {
            "params_before": report.params_before, "params_after": report.params_after,
            "macs_before": report.macs_before, "macs_after": report.macs_after, "round_to": report.round_to,
            "changed_layers": {k: list(map(list, v)) for k, v in report.changed_layers.items()},
        }  # fmt: skip
        if report.gradient_pass is not None:
            summary["gradient_pass"] = _gradient_pass_details(report.gradient_pass)
            print(report.gradient_pass.summary())
    else:
        raise ConfigError(f"method must be channels or depth, got {config['method']!r}")
    prunedm.save_pretrained(model.cpu(), out / "model")
    _write_json(out / "report.json", summary)
    print(f"pruned model saved to {out / 'model'}")
    return summary


def _gradient_pass_details(gradient_pass) -> dict:
    """What report.json keeps of a gradient pass: the timesteps it used and what they cost."""
    return {
        "timesteps": list(gradient_pass.timesteps), "num_timesteps": len(gradient_pass.timesteps),
        "stride": gradient_pass.stride, "stopped_early": gradient_pass.stopped_early, "passes": gradient_pass.passes,
        "seconds": gradient_pass.seconds, "threads": gradient_pass.threads, "summary": gradient_pass.summary(),
    }  # fmt: skip


def run_finetune(config: dict, out: Path, resume: bool) -> dict:
    """finetune: noise-prediction loss, or masked KD from distill.teacher, with EMA and checkpoints (DDP or FSDP
    under torchrun); writes model/ (EMA)."""
    from prunedm import save_pretrained
    from prunedm._atomic import remove_stale_temps
    from prunedm.cli.distill import distillation
    from prunedm.train import finetune

    rank, world = _distributed()
    try:  # every setting is checked before any work
        finetune_config = FinetuneConfig(**config["finetune"])
        finetune_config.validate(world)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if resume and rank == 0:
        remove_stale_temps(out)
    device = resolve_device(config["device"])
    model = _to(load_model(config["model"]), device)
    cond, data = conditioned_data(config, model, device)
    scheduler = training_scheduler(config, model)
    kd, kd_summary = distillation(config, model, data, device)  # (None, {}) without distill.teacher
    train = finetune
    if config["parallel"] == "fsdp":  # FSDP2: model, EMA and AdamW state sharded across ranks (prunedm.parallel)
        from prunedm.parallel.finetune import finetune_sharded

        train = finetune_sharded
    with training_dropout(model, cond, config["cond_dropout"]):
        result = train(model, data, out, finetune_config, scheduler=scheduler, resume=resume, distill=kd)
    summary = {"final_loss": result.final_loss, "steps": result.steps, **kd_summary}
    if rank == 0:
        save_pretrained(result.ema_model.cpu(), out / "model")
        _write_json(out / "report.json", summary)
        print(f"finetuned (EMA) model saved to {out / 'model'}; final loss {result.final_loss:.4f}")
    return summary


def _load_masks(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(str(path))
    if path.is_dir():
        path = path / "masks.safetensors"
    if not path.is_file():
        raise ConfigError(f"masks={path}: no such file (a masks.safetensors written by `prunedm learn-mask`)")
    try:
        return {name: mask.bool() for name, mask in load_file(str(path)).items()}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"masks={path}: not a safetensors file of masks ({exc})") from exc


def run_sparsify(config: dict, out: Path, resume: bool) -> dict:
    """sparsify: swap eligible Linear/Conv2d for 2:4-packed ones; writes model/, report.txt, report.json."""
    import prunedm

    device, dtype = resolve_device(config["device"]), resolve_dtype(config["dtype"])
    masks = _load_masks(config["masks"]) if config["masks"] else None
    model = _to(load_model(config["model"], config["seed"]).eval(), device, dtype)
    report = prunedm.sparsify(model, masks=masks, backend=config["backend"], verify=config["verify"])
    prunedm.save_pretrained(model.cpu(), out / "model")
    write_text_atomic(out / "report.txt", str(report) + "\n")
    summary = {
        "converted": [c.name for c in report.converted],
        "skipped": {s.name: s.reason for s in report.skipped},
        "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
        "model_bytes_before": report.model_bytes_before, "model_bytes_after": report.model_bytes_after,
    }  # fmt: skip
    _write_json(out / "report.json", summary)
    print(report)
    return summary


def _scheduler(config: dict):
    """The sampling scheduler config's scheduler= names, on the pipeline's noise schedule when there is one."""
    from diffusers import DDIMScheduler, DDPMScheduler

    name, flow = config["scheduler"], flow_scheduler(config)
    if flow is not None:  # an SD3 / Flux pipeline samples with its own flow-matching scheduler
        return flow
    if name not in ("ddim", "ddpm"):
        raise ConfigError(f"scheduler must be ddim or ddpm, got {name!r}")
    cls = DDIMScheduler if name == "ddim" else DDPMScheduler
    settings = scheduler_config(config)
    if settings is None:
        return cls(num_train_timesteps=1000)
    # The variance is not predicted here (a DiT's learned half is dropped, as DiTPipeline does): fixed variance.
    return cls.from_config({k: v for k, v in settings.items() if k != "variance_type"})


def _positive(config: dict, *keys: str) -> None:
    for key in keys:
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _sample_from(config: dict) -> torch.Tensor:
    """num_samples images in [-1, 1] from config's model (device, dtype, scheduler, steps, seed), conditioned
    on config's prompts or class_labels, with classifier-free guidance at guidance_scale."""
    from prunedm.eval.sampling import sample_images

    scheduler = _scheduler(config)
    device, dtype = resolve_device(config["device"]), resolve_dtype(config["dtype"])
    model = load_model(config["model"], config["seed"]).eval()
    cond = load_conditioning(config, model, device)
    conditions, null, scale = sampling_conditions(config, cond)
    latents = latent_space(config, device)  # a latent pipeline's VAE decodes the samples
    model = _to(model, device)
    with _autocast(device, dtype):
        images = sample_images(model, scheduler, config["num_samples"], config["steps"], seed=config["seed"],
                               conditions=conditions, null=null, guidance_scale=scale,
                               decode=latents.decode if latents is not None else None)  # fmt: skip
    return images.float()


def _save_samples(images: torch.Tensor, out: Path) -> None:
    from safetensors.torch import save_file

    with atomic_file(out / "samples.safetensors") as tmp:
        save_file({"images": images.contiguous()}, str(tmp))


def run_sample(config: dict, out: Path, resume: bool) -> dict:
    """sample: images from a UNet; writes samples.png (grid) and samples.safetensors ("images", [-1, 1])."""
    from prunedm.eval.sampling import save_grid

    images = _sample_from(config)
    save_grid(images, out / "samples.png")
    _save_samples(images, out)
    print(f"wrote {out / 'samples.png'} and {out / 'samples.safetensors'}")
    return {"num_samples": int(images.shape[0])}


def _samples_to_judge(spec) -> torch.Tensor | Path:
    """eval's samples=: a samples.safetensors (or the dir of a `prunedm sample` run) or an image folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(str(spec))
    if path.is_dir() and (path / "samples.safetensors").is_file():
        path = path / "samples.safetensors"
    if path.is_dir():
        return path
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(f"samples={spec}: expected a samples.safetensors from `prunedm sample` or an image folder")
    try:
        images = load_file(str(path)).get("images")
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"samples={spec}: not a readable safetensors file ({exc})") from exc
    if images is None or images.dim() != 4:
        raise ConfigError(f"samples={spec}: needs an 'images' tensor [N, C, H, W] in [-1, 1]")
    return images.float()


def run_eval(config: dict, out: Path, resume: bool) -> dict:
    """eval: FID (digits-classifier or Inception features) and the digits classifier's verdict on samples
    drawn from model= or read from samples=; writes metrics.json and samples.png."""
    from prunedm.eval.sampling import save_grid

    reference = config["reference"]  # the keys and their combination were checked by schema.validate_config
    from prunedm.eval.fid import evaluate_samples, load_image_folder

    if config["model"] is not None:
        images = _sample_from(config)
        _save_samples(images, out)
        source = {"model": config["model"]}
    else:
        images = _samples_to_judge(config["samples"])
        source = {"samples": str(config["samples"])}
    metrics = evaluate_samples(images, reference, features=config["features"], inception_dir=config["inception_dir"])
    grid = images if isinstance(images, torch.Tensor) else load_image_folder(images)
    save_grid(grid[:64], out / "samples.png")
    result = {**metrics, **source, "reference": str(reference)}
    _write_json(out / "metrics.json", result)
    print(
        f"FID {metrics['fid']:.2f} ({metrics['features']} features, {metrics['num_samples']} samples), "
        f"classifier accuracy {metrics['classifier_accuracy']:.3f}, class entropy {metrics['class_entropy']:.2f}; "
        f"wrote {out / 'metrics.json'}"
    )
    return result


def _denoising_loss(scheduler):
    """loss(model, batch): the noise-prediction loss at random timesteps of images (or a dict of images and
    their conditioning), drawn from the global RNG, which the mask learners replay to compare masks."""
    from prunedm.diffusion import denoising_loss

    return lambda model, batch: denoising_loss(model, scheduler, batch)


def run_learn_mask(config: dict, out: Path, resume: bool) -> dict:
    """learn-mask: N:M masks (maskllm, maskpro or magnitude), with checkpointed learner state and --resume
    (several processes under torchrun); writes masks.safetensors and model/ (the masked model)."""
    from safetensors.torch import save_file

    from prunedm import _atomic, save_pretrained
    from prunedm import masks as pm
    from prunedm.train.finetune import metrics_up_to
    from prunedm.train.mask_loop import learn_mask_steps

    method = config["method"]
    summary: dict = {"method": method, "pattern": config["pattern"]}
    if method not in ("maskllm", "maskpro", "magnitude"):
        raise ConfigError(f"method must be maskllm, maskpro or magnitude, got {method!r}")
    n, m = parse_pattern(config["pattern"])
    _positive(config, "steps", "batch_size", "checkpoint_every")
    rank, world = _distributed()
    if resume and rank == 0:  # what a killed writer left; only rank 0 writes in --out
        _atomic.remove_stale_temps(out)
    device = resolve_device(config["device"])
    model = _to(load_model(config["model"], config["seed"]), device)
    # The loss draws noise and timesteps from the global RNG; learner.load() restores its state at the checkpoint.
    torch.manual_seed(config["seed"])
    if method == "magnitude":
        targets, _ = pm.find_targets(model, m=m)
        found = pm.magnitude_masks(targets, n, m)
        pm.apply_masks(model, found)
    else:
        cond, images = conditioned_data(config, model, device)
        images = images.to(device)
        loss = _denoising_loss(training_scheduler(config, model))
        learner = _learner(config, model, loss, n, m)
        sharded = config["parallel"] == "fsdp"
        if sharded and learner.model_optimizer is not None:
            raise ConfigError(f"parallel: fsdp learns masks of a frozen model: {method}.model_lr must be 0")
        if sharded and config["batch_size"] % world:  # the ranks' mean losses and gradients are the joined batch's
            raise ConfigError(
                f"parallel: fsdp needs batch_size a multiple of {world} (the ranks), got {config['batch_size']}"
            )
        if sharded and world > 1:  # FSDP2: model, logits and Adam state sharded across ranks (prunedm.parallel)
            learner.shard()
        state = out / ("learner-sharded" if sharded else "learner.safetensors")
        if resume and state.exists():
            try:
                learner.load_sharded(state) if sharded else learner.load(state)
            except ValueError as exc:
                raise ConfigError(f"--resume: {exc}; delete {state} to learn afresh, or use a new --out") from None
        if rank == 0:  # lines of steps after the checkpoint are redone (and a line cut short by a kill dropped)
            metrics_up_to(out / "metrics.jsonl", learner.step_count)
        log = open(out / "metrics.jsonl", "a") if rank == 0 else None

        def after(done: int, info: dict) -> None:
            if log is not None:
                log.write(json.dumps({"step": done, **{k: v for k, v in info.items() if _scalar(v)}}) + "\n")
                log.flush()
            if done % config["checkpoint_every"] == 0 or done == config["steps"]:
                if sharded:  # every rank writes its shards; the directory appears whole or not at all
                    learner.save_sharded(state)
                elif rank == 0:
                    learner.save(state)  # whole or not at all

        try:
            with training_dropout(model, cond, config["cond_dropout"]):
                learn_mask_steps(learner, images, config["steps"], config["batch_size"], config["seed"], rank=rank,
                                 world_size=world, on_step=after, progress=rank == 0)  # fmt: skip
        finally:
            if log is not None:
                log.close()
        if method == "maskpro":  # whether the groups moved off the magnitude mask, and its loss before finetune
            if rank == 0 or sharded:  # forward passes only; sharded, they gather every block: all ranks run them
                summary["maskpro"] = learner.report(images[:REPORT_IMAGES])
            if rank == 0:
                print(_maskpro_line(summary["maskpro"]))
        if sharded or learner.compute_dtype is not None:  # frozen (or cast to bf16): mask a fresh copy
            found = learner.masks()
            model = load_model(config["model"], config["seed"])
            pm.apply_masks(model, found)
        else:
            found = learner.finalize()
    summary["masks"] = len(found)
    if rank == 0:
        with _atomic.atomic_file(out / "masks.safetensors") as tmp:
            save_file({name: mask.contiguous().cpu() for name, mask in found.items()}, str(tmp))
        save_pretrained(model.cpu(), out / "model")
        _write_json(out / "report.json", summary)
        print(f"{len(found)} {n}:{m} masks in {out / 'masks.safetensors'}; masked model in {out / 'model'}")
    return summary


def _learner(config: dict, model, loss, n: int, m: int):
    """The MaskLLM or MaskPro learner of config: only the keys set (not null) are passed, so the preset
    fills the rest."""
    from prunedm import masks as pm

    method = config["method"]
    options = {key: value for key, value in config[method].items() if value is not None}
    options["compute_dtype"] = torch.bfloat16 if config["mixed_precision"] == "bf16" else None
    if method == "maskllm":
        for key in ("tau", "scale"):
            if key in options:
                options[key] = tuple(options[key])
        return pm.MaskLLMLearner(model, loss, n, m, **options, total_steps=config["steps"], seed=config["seed"])
    return pm.MaskProLearner(model, loss, n, m, **options, total_steps=config["steps"], seed=config["seed"])


def _maskpro_line(report: dict) -> str:
    flipped = f"{report['groups_flipped']} of {report['groups']} groups flipped ({report['flipped_fraction']:.2%})"
    line = f"maskpro: {flipped}"
    if "mask_loss" in report:
        line += f"; loss {report['mask_loss']:.4f} (magnitude mask {report['initial_mask_loss']:.4f}) before finetune"
    return line


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool))


def run_demo(config: dict, out: Path, resume: bool) -> dict:
    """demo: the whole pipeline on the shipped digits DDPM (prunedm.cli.demo)."""
    from prunedm.cli.demo import run_pipeline

    # Finished stages are skipped whether or not --resume was given: each stage resumes from its own directory.
    return run_pipeline(config, out, resolve_device(config["device"]), RUNNERS)


RUNNERS = {
    "learn-mask": run_learn_mask,
    "prune": run_prune,
    "finetune": run_finetune,
    "sparsify": run_sparsify,
    "sample": run_sample,
    "eval": run_eval,
}

# Commands that may run as several processes under torchrun (the rest refuse, rather than race).
DISTRIBUTED = ("finetune", "learn-mask", "prune")  # prune: method=depth depth.learn=tinyfusion only
