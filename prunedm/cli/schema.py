"""The settings of every `prunedm` job in one place: each job's defaults and, per key, its type and
range (or choices) with a one-line doc, checked right after loading, before any work or --out exists."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prunedm.cli.config import ConfigError
from prunedm.nn import BACKENDS
from prunedm.pruning.channels import ROUNDINGS
from prunedm.pruning.importance import IMPORTANCES
from prunedm.train import FinetuneConfig
from prunedm.train.finetune import MIXED_PRECISION

DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
MASK_METHODS = ("maskllm", "maskpro", "magnitude")
SCHEDULERS = ("ddim", "ddpm")
FEATURES = ("digits-classifier", "inception")

DEFAULTS = {
    "prune": {
        "model": None,
        "seed": 0,
        "device": "auto",
        "method": "channels",  # channels | depth
        "channels": {"importance": "magnitude", "ratio": 0.3, "rounding": "diff-pruning", "data": "digits"},
        "depth": {"keep": None, "every": 2},
    },
    "finetune": {
        "model": None,
        "data": "digits",
        "device": "auto",
        "finetune": {f.name: f.default for f in fields(FinetuneConfig)},
    },
    "learn-mask": {
        "model": None,
        "data": "digits",
        "seed": 0,
        "device": "auto",
        "method": "maskllm",  # maskllm | maskpro | magnitude
        "pattern": "2:4",  # N:M; sparse tensor cores (and `prunedm sparsify`) run 2:4
        "steps": 100,
        "batch_size": 16,
        "checkpoint_every": 25,
        "maskllm": {"tau": [4.0, 0.05], "scale": [100.0, 500.0], "weight_reg": 0.0},
        "maskpro": {"logit_init": 10.0, "mask_lr": 50.0, "model_lr": 0.0},
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
    },
}

DEMO_DEFAULTS = {
    "model": "asset:digits-ddpm",  # the tiny DDPM trained on scikit-learn's digits (16x16), shipped
    "seed": 0,
    "device": "auto",
    "pack_check": True,  # pack DiT-XL/2-shaped weights to 2:4 and check the bytes against the reference
    # Diff-Pruning importance: the best of the four at equal budget in bench/results/quality.
    "prune": {"importance": "diff-pruning", "ratio": 0.3},
    "learn_mask": {"method": "maskllm", "steps": 100, "batch_size": 8},
    # ema_decay 0.98: an EMA horizon of ~50 steps; the usual 0.999 would keep the EMA near the unrecovered start.
    # 600 steps: FID 28.6 (dense 14.5) in about 4 minutes on 2 CPU cores; 150 steps gave 50.6 in 1 minute.
    "finetune": {"steps": 600, "batch_size": 32, "lr": 5e-4, "ema_decay": 0.98},
    "sample": {"num_samples": 256, "steps": 25, "scheduler": "ddim"},
    "eval": {"features": "digits-classifier", "inception_dir": None},
    "bench": {"batch_size": 64, "rounds": 3, "repeats": 3},
}


@dataclass(frozen=True)
class Key:
    """One config key: what it holds (kind), its range or choices, and a one-line doc."""

    kind: str  # int | number | bool | choice | text | pattern | pair | indices | any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes `low`
    high_open: bool = False  # the range excludes `high`
    choices: tuple = ()
    nullable: bool = False  # null (None) is allowed

    def describe(self) -> str:
        """What a valid value looks like, as the error message says it."""
        span = self._span()
        text = {
            "int": f"an integer {span}",
            "number": f"a number {span}",
            "bool": "true or false",
            "choice": "one of " + ", ".join(map(str, self.choices)),
            "text": "a non-empty text",
            "pattern": "an N:M pattern with 0 < N < M, e.g. 2:4",
            "pair": f"a list of two numbers {span} ([start, end])",
            "indices": "a non-empty list of distinct integers >= 0",
            "any": "anything",
        }[self.kind].strip()
        return f"{text} or null" if self.nullable else text

    def _span(self) -> str:
        low, high = _plain(self.low), _plain(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""

    def check(self, name: str, value: Any) -> Any:
        """`value` as the job reads it (1e3 -> 1000 where an integer goes, 124 -> "2:4"), or ConfigError."""
        if value is None and (self.nullable or self.kind == "any"):
            return None
        result = _CHECKS[self.kind](self, value)
        if result is _BAD:
            raise ConfigError(f"{name} must be {self.describe()}, got {_short(value)}")
        return result

    def _in_range(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)


_BAD = object()


def _plain(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _real(value: Any) -> float | None:
    """A finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):  # exact, however large (math.isfinite would overflow past 1e308)
        return value
    return value if math.isfinite(value) else None


def _check_int(key: Key, value: Any):
    x = _real(value)
    if x is None or (isinstance(x, float) and not x.is_integer()):  # 1e3 is 1000 where a count goes
        return _BAD
    return int(x) if key._in_range(x) else _BAD


def _check_number(key: Key, value: Any):
    x = _real(value)
    if x is None or not key._in_range(x):
        return _BAD
    try:
        return float(x)
    except OverflowError:
        return _BAD


def _check_pair(key: Key, value: Any):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return _BAD
    pair = [_check_number(key, v) for v in value]
    return _BAD if _BAD in pair else pair


def _check_indices(key: Key, value: Any):
    if not isinstance(value, (list, tuple)) or not value:
        return _BAD
    ints = [_check_int(key, v) for v in value]
    return _BAD if _BAD in ints or len(set(ints)) != len(ints) else ints


def _check_pattern(key: Key, value: Any):
    try:
        n, m = parse_pattern(value)
    except ConfigError:
        return _BAD
    return f"{n}:{m}"


_CHECKS = {
    "int": _check_int,
    "number": _check_number,
    "bool": lambda key, v: v if isinstance(v, bool) else _BAD,
    "choice": lambda key, v: v if isinstance(v, str) and v in key.choices else _BAD,
    "text": lambda key, v: v if isinstance(v, str) and v.strip() else _BAD,
    "pattern": _check_pattern,
    "pair": _check_pair,
    "indices": _check_indices,
    "any": lambda key, v: v,
}


def parse_pattern(text) -> tuple[int, int]:
    """'2:4' -> (2, 4): the N:M rule (keep N of every M consecutive weights, 0 < N < M)."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:  # unquoted 2:4 in YAML 1.1: 124
        text = "%d:%d" % divmod(text, 60)
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"pattern must look like N:M (e.g. 2:4), got {_short(text)}") from None
    if not 0 < n < m:
        raise ConfigError(f"pattern {text!r} breaks the N:M rule: need 0 < N < M")
    return n, m


def integer(doc: str, low: int | None = 0, high: int | None = None) -> Key:
    return Key("int", doc, low, high)


def number(doc: str, low=None, high=None, low_open=False, high_open=False, nullable=False) -> Key:
    return Key("number", doc, low, high, low_open, high_open, nullable=nullable)


def choice(doc: str, choices) -> Key:
    return Key("choice", doc, choices=tuple(choices))


def flag(doc: str) -> Key:
    return Key("bool", doc)


def text(doc: str, nullable: bool = False) -> Key:
    return Key("text", doc, nullable=nullable)


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
        "method": choice("channels (UNets, torch-pruning) or depth (DiT blocks)", ("channels", "depth")),
        "channels.importance": choice("channel importance", IMPORTANCES),
        "channels.ratio": RATIO,
        "channels.rounding": choice("how kept widths are rounded", ROUNDINGS),
        "channels.data": DATA,
        "depth.keep": Key("indices", "block indices to keep (null: every `every`-th)", 0, nullable=True),
        "depth.every": integer("keep every k-th block when keep is null", 1),
    },
    "finetune": {"model": MODEL, "data": DATA, "device": DEVICE}
    | {f"finetune.{name}": key for name, key in FINETUNE_KEYS.items()},
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
        "maskllm.tau": Key("pair", "Gumbel temperature, annealed start -> end", 0, low_open=True),
        "maskllm.scale": Key("pair", "logit scale, annealed start -> end", 0, low_open=True),
        "maskllm.weight_reg": number("weight regularisation strength", 0),
        "maskpro.logit_init": number("initial logit of the magnitude mask's entries", 0),
        "maskpro.mask_lr": LR,
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
    },
    "demo": {
        "model": text("the dense model the pipeline starts from"),
        "seed": SEED,
        "device": DEVICE,
        "pack_check": flag("pack DiT-XL/2-shaped weights to 2:4 and check the bytes"),
        "prune.importance": choice("channel importance", IMPORTANCES),
        "prune.ratio": RATIO,
        "learn_mask.method": choice("mask learner", MASK_METHODS),
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


# Rules that tie keys together, checked after every key passed its own check.
RULES = {job: (_need_model,) for job in ("prune", "finetune", "learn-mask", "sparsify", "sample")}
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
