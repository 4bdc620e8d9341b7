"""The settings of every `prunedm` job in one place: each job's defaults and, per key, its type and
range (or choices) with a one-line doc, checked right after loading, before any work or --out exists."""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

from prunedm.cli.config import ConfigError
from prunedm.cli.keys import Key, choice, flag, integer, number, parse_pattern, text  # noqa: F401  (re-exported)
from prunedm.masks.maskllm import PRESETS as MASKLLM_PRESETS
from prunedm.masks.maskllm import WEIGHT_REGS
from prunedm.masks.maskpro import BASELINES
from prunedm.masks.maskpro import PRESETS as MASKPRO_PRESETS
from prunedm.nn import BACKENDS
from prunedm.parallel import PARALLEL_MODES
from prunedm.pruning.channels import ROUNDINGS
from prunedm.pruning.importance import IMPORTANCES, MAX_TIMESTEPS
from prunedm.pruning.tinyfusion import TINYFUSION_PRESETS
from prunedm.train import FinetuneConfig
from prunedm.train.distill import DistillConfig
from prunedm.train.finetune import MIXED_PRECISION

DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
MASK_METHODS = ("maskllm", "maskpro", "magnitude")
SCHEDULERS = ("ddim", "ddpm")
DEPTH_LEARNERS = ("tinyfusion",)
FEATURES = ("digits-classifier", "inception")

# round_to "2:4": kept widths stay multiples of 8, so every 2:4-eligible layer stays so for sparsify.
# max_timesteps: the gradient pass's bound (every 10th of 1000 timesteps); null visits every one.
CHANNELS_DEFAULTS = {"importance": "magnitude", "ratio": 0.3, "rounding": "diff-pruning", "round_to": "2:4",
                     "max_timesteps": MAX_TIMESTEPS, "data": "digits"}  # fmt: skip
# null: the preset's value (prunedm.masks.maskllm/maskpro PRESETS). "official" follows the papers' code;
# "short" is prunedm's for tens to hundreds of steps, where the official constants barely move.
MASKLLM_DEFAULTS = {"preset": "official", "hard": None, "mask_lr": None, "init_std": None, "prior_strength": None,
                    "tau": None, "scale": None, "weight_reg": None, "weight_reg_kind": "official"}  # fmt: skip
MASKPRO_DEFAULTS = {"preset": "official", "samples": None, "baseline": None, "baseline_decay": None,
                    "normalize_advantage": None, "logit_init": None, "mask_lr": None, "model_lr": 0.0}  # fmt: skip

# depth.learn null: keep / every choose the blocks; tinyfusion: TinyFusion learns which keep_per_group of every
# group_size blocks to keep (prunedm.pruning.tinyfusion; preset official: VainF/TinyFusion's constants).
DEPTH_DEFAULTS = {"keep": None, "every": 2, "learn": None, "preset": "official", "group_size": 2,
                  "keep_per_group": 1, "steps": 100, "batch_size": 16, "logits_lr": None, "data": "digits",
                  "checkpoint_every": 25}  # fmt: skip
# Conditioned models (prunedm.cli.pipeline): pipeline: the pipeline dir whose text_encoder/ + tokenizer/, vae/,
# scheduler/ and id2label condition the model (null: model= itself when it is one). cond_dropout 0: diffusers'
# train_text_to_image drops no captions by default (--proportion_empty_prompts 0), and a DiT drops its labels itself
# in training mode (LabelEmbedding, class_dropout_prob 0.1 as in the official DiT); SD's pretraining dropped 10%.
CONDITIONING_TRAIN = {"pipeline": None, "cond_dropout": 0.0}
# guidance_scale null: the pipelines' defaults (text 7.5 as StableDiffusionPipeline, class 4.0 as DiTPipeline, 7 SD3,
# 5 SDXL; 1, no guidance, for a model without a null condition).
CONDITIONING_SAMPLE = {"pipeline": None, "prompts": None, "class_labels": None, "guidance_scale": None}
# The DistillConfig fields the distill.* keys set as they are (feature_layers: the "blocks" default).
DISTILL_WEIGHTS = ("kd_weight", "gt_weight", "feature_weight", "feature_decay_steps", "mask_sigma", "output_mask_sigma")

DEFAULTS = {
    "prune": {
        "model": None,
        "seed": 0,
        "device": "auto",
        "pipeline": None,  # conditioning for the gradient pass (CONDITIONING_TRAIN)
        "method": "channels",  # channels | depth
        "channels": CHANNELS_DEFAULTS,
        "parallel": "ddp",  # depth.learn under torchrun: ddp (the whole model on every rank) or fsdp (sharded)
        "depth": DEPTH_DEFAULTS,
    },
    "finetune": {
        "model": None,
        "data": "digits",
        "device": "auto",
        **CONDITIONING_TRAIN,
        "parallel": "ddp",  # ddp: every rank holds everything; fsdp: model, EMA and AdamW state sharded (FSDP2)
        "finetune": {f.name: f.default for f in fields(FinetuneConfig)},
        # Masked KD (prunedm.train.distill, prunedm.cli.distill): teacher null trains on the denoising loss alone.
        "distill": {"teacher": None, "keep_indices": None}
        | {f.name: f.default for f in fields(DistillConfig) if f.name in DISTILL_WEIGHTS},
    },
    "learn-mask": {
        "model": None,
        "data": "digits",
        "seed": 0,
        "device": "auto",
        **CONDITIONING_TRAIN,
        "method": "maskllm",  # maskllm | maskpro | magnitude
        "pattern": "2:4",  # N:M; sparse tensor cores (and `prunedm sparsify`) run 2:4
        "steps": 100,
        "batch_size": 16,
        "checkpoint_every": 25,
        "parallel": "ddp",  # ddp: every rank holds everything; fsdp: sharded (FSDP2, maskllm and maskpro)
        "mixed_precision": "no",  # bf16: the frozen model stored and run in bf16; logits and reductions fp32
        "maskllm": MASKLLM_DEFAULTS,
        "maskpro": MASKPRO_DEFAULTS,
    },
    "sparsify": {
        "model": None,
        "seed": 0,
        "device": "auto",
        "dtype": "float32",  # the packed weights' dtype; sparse tensor cores need float16 or bfloat16
        "masks": None,  # a masks.safetensors from learn-mask; None: magnitude 2:4 of every eligible layer
        "backend": "auto",
        "verify": True,
    },
    "sample": {
        "model": None,
        "seed": 0,
        "device": "auto",
        "dtype": "float32",  # float16/bfloat16 sample under autocast
        "num_samples": 16,
        "steps": 50,
        "scheduler": "ddim",
        **CONDITIONING_SAMPLE,
    },
    "eval": {
        "model": None,  # sample from this model ...
        "samples": None,  # ... or judge these: a samples.safetensors from `prunedm sample`, or an image folder
        "reference": "digits",  # or a folder of reference images
        "features": "digits-classifier",  # or inception (needs inception_dir)
        "inception_dir": None,
        "num_samples": 256,
        "steps": 50,
        "scheduler": "ddim",
        "seed": 0,
        "device": "auto",
        "dtype": "float32",
        **CONDITIONING_SAMPLE,
    },
}

DEMO_DEFAULTS = {
    "model": "asset:digits-ddpm",  # the tiny DDPM trained on scikit-learn's digits (16x16), shipped
    "seed": 0,
    "device": "auto",
    "pack_check": True,  # pack DiT-XL/2-shaped weights to 2:4 and check the bytes against the reference
    # Diff-Pruning importance: the best of the four at equal budget in bench/results/quality.
    "prune": {"importance": "diff-pruning", "ratio": 0.3},
    # MaskLLM's official preset learns in this budget: after the prune stage, 100 steps moved 6.6% of the weights
    # off the magnitude mask, loss 0.040 vs 0.242 (short: 0.043). MaskPro needs preset short here (its recipe).
    "learn_mask": {"method": "maskllm", "preset": "official", "steps": 100, "batch_size": 8},
    # ema_decay 0.98: an EMA horizon of ~50 steps; the usual 0.999 would keep the EMA near the unrecovered start.
    # 600 steps: FID 24.1 (dense 14.5) after MaskLLM official 100 steps (2026-12-01; 28.6 before); 150 steps gave 50.6.
    "finetune": {"steps": 600, "batch_size": 32, "lr": 5e-4, "ema_decay": 0.98},
    "sample": {"num_samples": 256, "steps": 25, "scheduler": "ddim"},
    "eval": {"features": "digits-classifier", "inception_dir": None},
    "bench": {"batch_size": 64, "rounds": 3, "repeats": 3},
}


# Past 64 a width multiple removes most channels of a UNet's narrow layers; the cap also refuses an unquoted
# N:M other than 2:4, which YAML 1.1 reads as a base-60 integer (2:8 -> 128).
ROUND_TO_MAX = 64
MAX_BATCH = 65_536  # far above what fits in memory for these models; a typo (1e9) fails here, not in malloc
MODEL = text("a diffusers or prunedm model dir, arch:NAME (random init) or asset:NAME (shipped)", nullable=True)
DATA = text("training images: digits, a folder of images, or a .safetensors with an 'images' tensor")
SEED = integer("random seed", 0, 2**32 - 1)
DEVICE = choice("where to run (auto: cuda when visible, else cpu)", DEVICES)
DTYPE = choice("compute dtype", DTYPE_NAMES)
BATCH = integer("images per step", 1, MAX_BATCH)
TRAIN_STEPS = integer("optimisation steps", 1, 10**9)
SAMPLE_STEPS = integer("denoising steps (the schedulers are trained with 1000 timesteps)", 1, 1000)
NUM_SAMPLES = integer("images to sample", 1, 100_000)
SCHEDULER = choice("the sampling scheduler", SCHEDULERS)
LR = number("learning rate", 0, low_open=True)
RATIO = number("fraction of channels removed", 0, 1, low_open=True, high_open=True)
EMA_DECAY = number("EMA decay per step", 0, 1, high_open=True)

PIPELINE = text("the diffusers pipeline dir conditioning the model (text_encoder/ + tokenizer/, vae/, scheduler/, "
               "id2label; null: model= when it is a pipeline dir)", nullable=True)  # fmt: skip
CONDITIONING_TRAIN_KEYS = {
    "pipeline": PIPELINE,
    "cond_dropout": number("chance a sample's caption or class is swapped for the null one", 0, 1, high_open=True),
}
CONDITIONING_SAMPLE_KEYS = {
    "pipeline": PIPELINE,
    "prompts": Key("texts", "prompts of a text-conditioned model, cycled over the samples", nullable=True),
    "class_labels": Key("labels", "class ids or id2label names, cycled (null: every class in turn)", 0, nullable=True),
    "guidance_scale": number(
        "classifier-free guidance scale (1: none; null: 7.5 text, 4 class, 7 SD3, 5 SDXL)", 0, nullable=True
    ),
}

DISTILL_KEYS = {
    "teacher": text("masked KD's teacher: a model dir, arch:/asset:NAME, or original (the model the prunedm job that "
                    "wrote model= started from); null: no distillation", nullable=True),
    "keep_indices": Key("indices", "the teacher block each student block came from (null: blocks 1:1, or a depth "
                        "prune's kept_blocks with teacher original)", 0, nullable=True),
    "kd_weight": number("weight of the output KD term (MSE to the teacher's prediction)", 0),
    "gt_weight": number("weight of the ground-truth denoising term", 0),
    "feature_weight": number("beta, the masked feature term's weight over matched transformer blocks", 0),
    "feature_decay_steps": integer("beta decays linearly to 0 over these steps (null: constant)", 1, nullable=True),
    "mask_sigma": number("feature masking: elements beyond mean +/- sigma std dropped (null: plain MSE)", 0,
                         low_open=True, nullable=True),
    "output_mask_sigma": number("output KD masking by the teacher's mean +/- sigma std (null: plain MSE)", 0,
                                low_open=True, nullable=True),
}  # fmt: skip

FINETUNE_KEYS = {
    "steps": TRAIN_STEPS,
    "batch_size": integer("global batch (each of W processes takes batch_size / W)", 1, MAX_BATCH),
    "lr": LR,
    "weight_decay": number("AdamW weight decay", 0),
    "warmup_steps": integer("linear learning-rate warm-up steps", 0),
    "ema_decay": EMA_DECAY,
    "ema_warmup": flag("ramp the EMA decay up over the first steps"),
    "grad_clip": number("gradient norm clip (null: none)", 0, low_open=True, nullable=True),
    "mixed_precision": choice("autocast dtype", MIXED_PRECISION),
    "checkpoint_every": integer("steps between checkpoints", 1),
    "keep_checkpoints": integer("checkpoints kept on disk (>= 1, or --resume has nothing to resume)", 1),
    "log_every": integer("steps between metrics.jsonl lines", 1),
    "seed": SEED,
    "progress": flag("show a progress bar"),
    "keep_sparsity": flag("keep the 2:4 zero pattern of exactly 2:4 weights while training"),
}

SCHEMA: dict[str, dict[str, Key]] = {
    "prune": {
        "model": MODEL,
        "seed": SEED,
        "device": DEVICE,
        "pipeline": PIPELINE,
        "method": choice("channels (UNets, torch-pruning) or depth (DiT blocks)", ("channels", "depth")),
        "channels.importance": choice("channel importance", IMPORTANCES),
        "channels.ratio": RATIO,
        "channels.rounding": choice("how kept widths are rounded", ROUNDINGS),
        "channels.round_to": Key(
            "int",
            'kept widths rounded down to a multiple of this ("2:4": of 8, so 2:4-eligible '
            "layers stay so; null: the rule's exact widths)",
            1,
            ROUND_TO_MAX,
            nullable=True,
            texts=("2:4",),
        ),
        "channels.max_timesteps": integer(
            "most timesteps the gradient pass visits, evenly spaced (null: every one)", 1, nullable=True
        ),
        "channels.data": DATA,
        "depth.keep": Key("indices", "block indices to keep (null: every `every`-th)", 0, nullable=True),
        "depth.every": integer("keep every k-th block when keep is null", 1),
        "depth.learn": choice("learn the blocks to keep (null: keep / every)", DEPTH_LEARNERS, nullable=True),
        "depth.preset": choice("official (VainF/TinyFusion) or short (for tens of steps)", TINYFUSION_PRESETS),
        "depth.group_size": integer("blocks per group; the search keeps keep_per_group of each", 1),
        "depth.keep_per_group": integer("blocks kept of each group", 1),
        "depth.steps": TRAIN_STEPS,
        "depth.batch_size": integer("images per step (parallel=fsdp: split evenly over the ranks)", 1, MAX_BATCH),
        "depth.logits_lr": number("learning rate of the keep logits (null: preset)", 0, low_open=True, nullable=True),
        "depth.data": DATA,
        "depth.checkpoint_every": integer("steps between search checkpoints (--resume continues)", 1),
        "parallel": choice("depth.learn under torchrun: ddp, the whole model per rank; fsdp, sharded", PARALLEL_MODES),
    },
    "finetune": {"model": MODEL, "data": DATA, "device": DEVICE, **CONDITIONING_TRAIN_KEYS}
    | {"parallel": choice("ddp: every rank holds everything; fsdp: model, EMA, AdamW state sharded", PARALLEL_MODES)}
    | {f"finetune.{name}": key for name, key in FINETUNE_KEYS.items()}
    | {f"distill.{name}": key for name, key in DISTILL_KEYS.items()},
    "learn-mask": {
        "model": MODEL,
        "data": DATA,
        "seed": SEED,
        "device": DEVICE,
        "method": choice("mask learner", MASK_METHODS),
        "pattern": Key("pattern", "keep N of every M weights"),
        "steps": TRAIN_STEPS,
        "batch_size": BATCH,
        "checkpoint_every": integer("steps between learner checkpoints", 1),
        "parallel": choice("ddp: every rank holds model and logits; fsdp: both sharded across ranks", PARALLEL_MODES),
        "mixed_precision": choice("bf16: frozen model in bf16; logits, Adam state, reductions fp32", ("no", "bf16")),
        **CONDITIONING_TRAIN_KEYS,
        "maskllm.preset": choice(
            "official (NVlabs/MaskLLM) or short (hard masks, lr 5e-3); fills every null", MASKLLM_PRESETS
        ),
        "maskllm.hard": flag("hard (straight-through) Gumbel masks instead of soft (null: preset)", nullable=True),
        "maskllm.mask_lr": number(
            "learning rate of the pattern logits (null: preset)", 0, low_open=True, nullable=True
        ),
        "maskllm.init_std": number("std of the initial logits (null: preset)", 0, low_open=True, nullable=True),
        "maskllm.prior_strength": number(
            "lift of the magnitude prior's pattern, in logit stds (null: preset)", 0, low_open=True, nullable=True
        ),
        "maskllm.tau": Key(
            "pair", "Gumbel temperature, annealed start -> end (null: preset)", 0, low_open=True, nullable=True
        ),
        "maskllm.scale": Key(
            "pair", "logit scale, annealed start -> end (null: preset)", 0, low_open=True, nullable=True
        ),
        "maskllm.weight_reg": number("weight regularisation strength (null: preset; 0: off)", 0, nullable=True),
        "maskllm.weight_reg_kind": choice(
            "official: -(1 - t/T) sum ||W.M||^2; normalized: mean 1 - ||W.M||^2/||W||^2", WEIGHT_REGS
        ),
        "maskpro.preset": choice(
            "official (woodenchild95/Maskpro) or short (K samples, leave-one-out); fills every null", MASKPRO_PRESETS
        ),
        "maskpro.samples": integer("masks sampled per step (null: preset)", 1, nullable=True),
        "maskpro.baseline": choice(
            "REINFORCE baseline (loo needs samples >= 2; null: preset)", BASELINES, nullable=True
        ),
        "maskpro.baseline_decay": number(
            "EMA decay of the baseline and advantage RMS (null: preset)", 0, 1, high_open=True, nullable=True
        ),
        "maskpro.normalize_advantage": flag("divide advantages by their running RMS (null: preset)", nullable=True),
        "maskpro.logit_init": Key(
            "number",
            "initial logit of the magnitude mask's entries (budget: from steps; null: preset)",
            0,
            low_open=True,
            nullable=True,
            texts=("budget",),
        ),
        "maskpro.mask_lr": number("SGD learning rate of the logits (null: preset)", 0, low_open=True, nullable=True),
        "maskpro.model_lr": number("learning rate of the weights (0: frozen)", 0),
    },
    "sparsify": {
        "model": MODEL,
        "seed": SEED,
        "device": DEVICE,
        "dtype": DTYPE,
        "masks": text("a masks.safetensors from learn-mask (null: magnitude 2:4)", nullable=True),
        "backend": choice("sparse kernel backend", BACKENDS),
        "verify": flag("check each converted layer against dense once"),
    },
    "sample": {
        "model": MODEL,
        "seed": SEED,
        "device": DEVICE,
        "dtype": DTYPE,
        "num_samples": NUM_SAMPLES,
        "steps": SAMPLE_STEPS,
        "scheduler": SCHEDULER,
        **CONDITIONING_SAMPLE_KEYS,
    },
    "eval": {
        "model": MODEL,
        "samples": text("a samples.safetensors from `prunedm sample` or an image folder", nullable=True),
        "reference": text("digits, or a folder of reference images"),
        "features": choice("FID feature extractor", FEATURES),
        "inception_dir": text("the dir holding inception-2015-12-05.pt", nullable=True),
        "num_samples": NUM_SAMPLES,
        "steps": SAMPLE_STEPS,
        "scheduler": SCHEDULER,
        "seed": SEED,
        "device": DEVICE,
        "dtype": DTYPE,
        **CONDITIONING_SAMPLE_KEYS,
    },
    "demo": {
        "model": text("the dense model the pipeline starts from"),
        "seed": SEED,
        "device": DEVICE,
        "pack_check": flag("pack DiT-XL/2-shaped weights to 2:4 and check the bytes"),
        "prune.importance": choice("channel importance", IMPORTANCES),
        "prune.ratio": RATIO,
        "learn_mask.method": choice("mask learner", MASK_METHODS),
        "learn_mask.preset": choice("the learner's preset (maskllm, maskpro)", MASKLLM_PRESETS),
        "learn_mask.steps": TRAIN_STEPS,
        "learn_mask.batch_size": BATCH,
        "finetune.steps": TRAIN_STEPS,
        "finetune.batch_size": BATCH,
        "finetune.lr": LR,
        "finetune.ema_decay": EMA_DECAY,
        "sample.num_samples": NUM_SAMPLES,
        "sample.steps": SAMPLE_STEPS,
        "sample.scheduler": SCHEDULER,
        "eval.features": choice("FID feature extractor", FEATURES),
        "eval.inception_dir": text("the dir holding inception-2015-12-05.pt", nullable=True),
        "bench.batch_size": integer("batch of the latency benchmark", 1, 4096),
        "bench.rounds": integer("interleaved timing rounds", 1, 1000),
        "bench.repeats": integer("timed forwards per round", 1, 1000),
    },
}


def _inferred(default: Any) -> Key:
    """A key for a setting the table does not list yet (e.g. a new FinetuneConfig field): its default's type."""
    if isinstance(default, bool):
        return flag("")
    if isinstance(default, int):
        return integer("", 0)
    if isinstance(default, float):
        return number("")
    return Key("any", "")


def _leaves(tree: dict, where: str = ""):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{where}{name}.")
        else:
            yield f"{where}{name}", value


def job_defaults(job: str) -> dict:
    return DEMO_DEFAULTS if job == "demo" else DEFAULTS[job]


def _need_model(config: dict) -> None:
    if not config["model"]:
        raise ConfigError("no model given: set model=<dir> (a diffusers or prunedm model dir) or model=arch:tiny-unet")


def _eval_sources(config: dict) -> None:
    if (config["model"] is None) == (config["samples"] is None):
        raise ConfigError("eval needs exactly one of model=<model to sample from> or samples=<file or folder>")
    if config["features"] == "inception" and not config["inception_dir"]:
        raise ConfigError("features=inception needs inception_dir=<dir holding inception-2015-12-05.pt>")
    reference = config["reference"]
    if reference != "digits" and not Path(reference).is_dir():
        raise ConfigError(f"reference={reference}: expected 'digits' or a folder of images")


def _maskpro_baseline(config: dict) -> None:
    if config["method"] != "maskpro":
        return
    c = config["maskpro"]
    preset = MASKPRO_PRESETS[c["preset"]]
    baseline, samples = (preset[key] if c[key] is None else c[key] for key in ("baseline", "samples"))
    if baseline == "loo" and samples < 2:
        raise ConfigError(
            f"maskpro.baseline loo (leave-one-out) needs maskpro.samples >= 2, got {samples} "
            f"(preset {c['preset']}: baseline {preset['baseline']}, samples {preset['samples']})"
        )


def _mask_mixed_precision(config: dict) -> None:
    if config["mixed_precision"] == "no":
        return
    if config["method"] == "magnitude":
        raise ConfigError("mixed_precision bf16 applies to method maskllm or maskpro (magnitude runs no model)")
    if config["method"] == "maskpro" and config["maskpro"]["model_lr"]:
        raise ConfigError("mixed_precision bf16 learns masks of a frozen model: maskpro.model_lr must be 0")


# Rules that tie keys together, checked after every key passed its own check.
RULES = {job: (_need_model,) for job in ("prune", "finetune", "learn-mask", "sparsify", "sample")}
RULES["learn-mask"] += (_maskpro_baseline, _mask_mixed_precision)
RULES["eval"] = (_eval_sources,)


def validate_config(job: str, config: dict, rules: bool = True) -> dict:
    """`config` (a loaded job config) with every key checked against SCHEMA[job] and (rules=True) the
    job's RULES; returns it normalised (1e3 -> 1000 where an integer goes, 2:4 as text). Raises
    ConfigError naming the first bad key, its valid range and the value given."""
    checked = copy.deepcopy(config)
    table = SCHEMA[job]
    for name, default in _leaves(job_defaults(job)):
        *parents, leaf = name.split(".")
        holder = checked
        for part in parents:
            holder = holder[part]
        holder[leaf] = table.get(name, _inferred(default)).check(name, holder[leaf])
    for rule in RULES.get(job, ()) if rules else ():
        rule(checked)
    return checked


def describe_keys(job: str) -> list[str]:
    """One line per key of `job`: name, default, what it must be, and what it is for (for --help)."""
    table = SCHEMA[job]
    lines = []
    for name, default in _leaves(job_defaults(job)):
        key = table.get(name, _inferred(default))
        lines.append(f"{name} = {default!r}: {key.describe()}" + (f". {key.doc}" if key.doc else ""))
    return lines
