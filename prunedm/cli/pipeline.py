"""Conditioning for the CLI jobs: the parts of a local diffusers pipeline dir that condition its denoiser
(text_encoder/ + tokenizer/, an SD3's or Flux's second and T5 encoders, scheduler/, a DiT's id2label in
model_index.json), loaded local-only and safely, and the conditioned training data and sampling conditions a
job's config asks for."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunedm._optional import optional_import
from prunedm.cli.config import ConfigError
from prunedm.cli.models import (
    check_weights,
    folder_images,
    image_files,
    load_diffusers,
    pipeline_denoiser,
    training_images,
)
from prunedm.conditioning import (
    CONDITION_KEYS,
    JointTextEncoder,
    TextEncoder,
    condition_dropout,
    conditioning_kind,
    null_class,
    num_classes,
    text_family,
)
from prunedm.diffusion import latent_shape
from prunedm.serialization import check_config, read_safetensors_header

# Text encoders and tokenizers built from their concrete classes (never Auto classes, so no code in the dir runs).
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_ENCODERS, T5_TOKENIZERS = ("T5EncoderModel",), ("T5TokenizerFast", "T5Tokenizer")  # one class in transformers 5
# The MMDiT pipelines' parts: (encoder dir, tokenizer dir, encoder classes, tokenizer classes), CLIPs first, T5 last.
JOINT_PARTS = {
    "sd3": [("text_encoder", "tokenizer", ("CLIPTextModelWithProjection",), TOKENIZERS),
            ("text_encoder_2", "tokenizer_2", ("CLIPTextModelWithProjection",), TOKENIZERS),
            ("text_encoder_3", "tokenizer_3", T5_ENCODERS, T5_TOKENIZERS)],
    "flux": [("text_encoder", "tokenizer", ("CLIPTextModel",), TOKENIZERS),
             ("text_encoder_2", "tokenizer_2", T5_ENCODERS, T5_TOKENIZERS)],
}  # fmt: skip
JOINT_KEYS = ("encoder_hidden_states", "pooled_projections")
# A Flux transformer with guidance_embeds (guidance-distilled, FLUX.1-dev) gets the guidance value, not CFG:
# 3.5 as FluxPipeline samples and diffusers' train_dreambooth_flux trains with.
FLUX_GUIDANCE = 3.5
MAX_JSON_BYTES = 16 << 20  # a pipeline's JSON files (configs, id2label, tokenizer.json of CLIP is 2 MB)
# Guidance scale when the config leaves it null: StableDiffusionPipeline's 7.5, DiTPipeline's 4.0,
# StableDiffusion3Pipeline's 7.0.
DEFAULT_GUIDANCE = {"text": 7.5, "class": 4.0, "none": 1.0, "sd3": 7.0}


@dataclass
class Conditioning:
    """What the job's model is conditioned on, and where the conditions come from."""

    kind: str  # none | text | class
    model_name: str  # the model's class name, for messages
    encoder: TextEncoder | JointTextEncoder | None = None
    family: str = "clip"  # a text model's prompt encoding: clip | sd3 | flux
    guidance_embeds: bool = False  # a Flux transformer that takes the guidance value
    num_classes: int | None = None
    null_class: int | None = None
    labels: dict[str, int] = field(default_factory=dict)  # class names (id2label, lower case) -> ids

    @property
    def key(self) -> str | tuple[str, ...] | None:
        """The model's condition key, or for an SD3/Flux transformer its keys (embeddings, pooled projections)."""
        return JOINT_KEYS if self.family != "clip" else CONDITION_KEYS.get(self.kind)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{key: per-prompt condition} for a text-conditioned model."""
        out = self.encoder(prompts)
        return out if isinstance(out, dict) else {self.key: out}

    def null(self):
        """One sample's null condition (guidance's unconditional branch; a tuple along `key` for SD3/Flux), or
        None when the model has none."""
        if self.kind == "text":
            null = self.encoder.null()
            return tuple(null[k] for k in JOINT_KEYS) if isinstance(null, dict) else null
        if self.kind == "class" and self.null_class is not None:
            return torch.tensor(self.null_class)
        return None

    def class_id(self, name, where: str) -> int:
        """The label id of a class given as an integer id or a name from the pipeline's id2label."""
        text = str(name).strip()
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        if text.lower() in self.labels:
            return self.labels[text.lower()]
        known = f"; id2label names, e.g. {', '.join(list(self.labels)[:5])}" if self.labels else ""
        raise ConfigError(f"{where}: {name!r} is not a class of this {self.model_name} (ids 0..{self.num_classes - 1}"
                          f"{known})")  # fmt: skip


def pipeline_of(config: dict) -> Path | None:
    """The pipeline dir conditioning comes from: pipeline=, else model= when that is a pipeline dir."""
    if config.get("pipeline"):
        path = Path(config["pipeline"])
        if not path.is_dir():
            raise ConfigError(f"pipeline={path}: no such dir (a diffusers pipeline dir: unet/ or transformer/, ...)")
        return path
    model = config.get("model")
    if isinstance(model, str) and pipeline_denoiser(Path(model)) is not None:
        return Path(model)
    return None


def _read_json(file: Path) -> dict:
    if file.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(f"{file} is larger than {MAX_JSON_BYTES} bytes: not a pipeline config")
    try:
        data = json.loads(file.read_text())
        check_config(data, file, file.name)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{file} is not a valid config: {exc}") from None
    return data


def load_conditioning(config: dict, model, device: torch.device) -> Conditioning:
    """The Conditioning of `model`, with a text-conditioned model's tokenizer and text encoder loaded from the
    pipeline dir; ConfigError when a part it needs is missing."""
    name = type(model).__name__
    try:
        kind = conditioning_kind(model)
    except ValueError as exc:
        raise ConfigError(f"model={config['model']}: {exc}") from None
    root = pipeline_of(config)
    if kind == "text":
        if root is None:
            raise ConfigError(f"model={config['model']}: a {name} is text-conditioned: point model= (or pipeline=) "
                              "at the pipeline dir holding its text_encoder/ and tokenizer/")  # fmt: skip
        family = text_family(model)
        if family != "clip":
            encoder = _joint_encoder(root, model, family, device)
            return Conditioning(kind, name, encoder=encoder, family=family,
                                guidance_embeds=bool(model.config.get("guidance_embeds")))  # fmt: skip
        return Conditioning(kind, name, encoder=_text_encoder(root, name, device))
    if kind == "class":
        labels = {}
        if root is not None and (root / "model_index.json").is_file():
            labels = _labels(_read_json(root / "model_index.json").get("id2label") or {}, root)
        return Conditioning(kind, name, num_classes=num_classes(model), null_class=null_class(model), labels=labels)
    return Conditioning(kind, name)


def _labels(id2label: dict, root: Path) -> dict[str, int]:
    """Class names -> ids from DiTPipeline's id2label ("207": "golden retriever", ...; comma-separated synonyms)."""
    labels = {}
    for key, value in id2label.items() if isinstance(id2label, dict) else ():
        if not (str(key).isdigit() and isinstance(value, str)):
            raise ConfigError(f"{root / 'model_index.json'}: id2label must map ids to names, got {key!r}: {value!r}")
        for synonym in value.split(","):
            labels.setdefault(synonym.strip().lower(), int(key))
    return labels


def _text_encoder(root: Path, model_name: str, device: torch.device) -> TextEncoder:
    for part in (root / "text_encoder", root / "tokenizer"):
        if not part.is_dir():
            raise ConfigError(f"pipeline {root}: no {part.name}/; a {model_name} is text-conditioned and needs "
                              "text_encoder/ and tokenizer/ beside its unet/")  # fmt: skip
    encoder = _load_encoder(root / "text_encoder", TEXT_ENCODERS)
    return TextEncoder(_load_tokenizer(root / "tokenizer", TOKENIZERS), encoder, device)


def _joint_encoder(root: Path, model, family: str, device: torch.device) -> JointTextEncoder:
    """An SD3's CLIP-L, CLIP-G and optional T5, or a Flux's CLIP and T5, with their tokenizers, their widths
    checked against the transformer's joint_attention_dim and pooled_projection_dim before any is loaded."""
    name, parts = type(model).__name__, JOINT_PARTS[family]
    found = []
    for encoder_dir, tokenizer_dir, encoders, tokenizers in parts:
        present = [(root / d).is_dir() for d in (encoder_dir, tokenizer_dir)]
        optional = family == "sd3" and encoders == T5_ENCODERS  # StableDiffusion3Pipeline runs without T5
        if optional and not any(present):
            continue
        for d, there in zip((encoder_dir, tokenizer_dir), present):
            if not there:
                need = ", ".join(f"{e}/ + {t}/" for e, t, *_ in parts) + (" (T5 optional)" if family == "sd3" else "")
                raise ConfigError(f"pipeline {root}: no {d}/; a {name} needs {need}")
        found.append((root / encoder_dir, root / tokenizer_dir, encoders, tokenizers))
    configs = [_encoder_config(e, classes) for e, _, classes, _ in found]
    t5 = configs.pop() if found[-1][2] == T5_ENCODERS else None
    joint, pooled = model.config.joint_attention_dim, model.config.pooled_projection_dim
    widths = [c.get("projection_dim") if family == "sd3" else c.get("hidden_size") for c in configs]
    problems = []
    if t5 is not None and t5.get("d_model") != joint:
        problems.append(f"T5 d_model {t5.get('d_model')} != joint_attention_dim {joint}")
    if family == "sd3" and sum(c.get("hidden_size") or 0 for c in configs) > joint:
        problems.append(f"the CLIP widths {[c.get('hidden_size') for c in configs]} exceed joint_attention_dim {joint}")
    if sum(w or 0 for w in widths) != pooled:
        problems.append(f"the CLIP pooled widths {widths} do not add up to pooled_projection_dim {pooled}")
    if problems:
        raise ConfigError(f"pipeline {root}: its text encoders do not fit the {name}: {'; '.join(problems)}")
    loaded = [(_load_tokenizer(t, tokenizers), _load_encoder(e, classes)) for e, t, classes, tokenizers in found]
    return JointTextEncoder(family, loaded[: len(configs)], loaded[-1] if t5 is not None else None, joint, device)


def _encoder_config(encoder_dir: Path, classes: tuple[str, ...]) -> dict:
    file = encoder_dir / "config.json"
    if not file.is_file():
        raise ConfigError(f"{encoder_dir}: no config.json (a {' or '.join(classes)} saved by transformers)")
    config = _read_json(file)
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in classes:
        raise ConfigError(f"{file}: text encoder {architecture!r} is not supported here ({', '.join(classes)})")
    return config


def _load_encoder(encoder_dir: Path, classes: tuple[str, ...]):
    """A text encoder of one of `classes` (concrete transformers classes) from safetensors, local-only, its
    config's sizes held against the weights' headers before anything is allocated."""
    transformers = optional_import("transformers", f"text conditioning (the text encoder in {encoder_dir})")
    config = _encoder_config(encoder_dir, classes)
    architecture = config["architectures"][0]
    cls = getattr(transformers, architecture)
    weights = encoder_dir / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{encoder_dir}: no model.safetensors (text encoders load from safetensors weights only)")
    try:
        header = read_safetensors_header(weights)
        settings = cls.config_class.from_dict({k: v for k, v in config.items() if k != "auto_map"})
        with torch.device("meta"):  # sizes checked against the weights before anything is allocated
            meta = cls(settings)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{encoder_dir}: not a loadable {architecture}: {exc}") from None
    check_weights(meta, encoder_dir / "config.json", weights, header)
    bars = transformers.utils.logging
    was_on = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # stderr is for the job's own messages
    try:
        return cls.from_pretrained(encoder_dir, local_files_only=True, use_safetensors=True)
    finally:
        if was_on:
            bars.enable_progress_bar()


def _load_tokenizer(tokenizer_dir: Path, classes: tuple[str, ...]):
    """A tokenizer of one of `classes` (tokenizer_config.json's tokenizer_class, default the first), local-only."""
    transformers = optional_import("transformers", f"text conditioning (the tokenizer in {tokenizer_dir})")
    tokenizer_config = tokenizer_dir / "tokenizer_config.json"
    kind = _read_json(tokenizer_config).get("tokenizer_class") if tokenizer_config.is_file() else None
    kind = kind or classes[0]
    if kind not in classes:
        raise ConfigError(f"{tokenizer_config}: tokenizer {kind!r} is not supported here ({', '.join(classes)})")
    for file in tokenizer_dir.iterdir():
        if file.is_file() and file.stat().st_size > MAX_JSON_BYTES:
            raise ConfigError(f"{file} is larger than {MAX_JSON_BYTES} bytes: not a tokenizer file")
    try:
        return getattr(transformers, kind).from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{tokenizer_dir}: not a loadable {kind}: {exc}") from None


def scheduler_config(config: dict) -> dict | None:
    """The pipeline's scheduler/scheduler_config.json (betas, timesteps, prediction type), or None."""
    root = pipeline_of(config)
    file = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if file is None or not file.is_file():
        return None
    return {k: v for k, v in _read_json(file).items() if not k.startswith("_")}


def training_scheduler(config: dict, model=None):
    """The noise schedule a job trains with: the pipeline's scheduler config (DDPM, or flow matching where the
    pipeline's scheduler is FlowMatchEulerDiscreteScheduler, an SD3's or Flux's), else DDPM over 1000 steps.
    Flow matching draws timesteps as diffusers' recipes default: logit_normal for SD3 (train_dreambooth_sd3),
    uniform for Flux (train_dreambooth_flux's "none")."""
    DDPMScheduler = optional_import("diffusers", "the training noise schedule").DDPMScheduler  # noqa: N806

    scheduler = flow_scheduler(config)
    if scheduler is not None:
        scheduler.timestep_density = "uniform" if model is not None and text_family(model) == "flux" else "logit_normal"
        return scheduler
    settings = scheduler_config(config)
    return DDPMScheduler(num_train_timesteps=1000) if settings is None else DDPMScheduler.from_config(settings)


class LatentSpace:
    """A latent pipeline's VAE (vae/): training images are encoded once (the posterior mean, times the
    scaling factor, as diffusers' pipelines scale latents) and samples decoded, under no_grad."""

    def __init__(self, vae, device: torch.device):
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.device, config = device, vae.config
        self.factor = 2 ** (len(config.block_out_channels) - 1)  # pixels per latent, as the pipelines compute it
        self.channels, self.scale = config.in_channels, config.scaling_factor
        self.shift = config.get("shift_factor") or 0.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        chunks = [self.vae.encode(images[i : i + batch_size].to(self.device)).latent_dist.mean
                  for i in range(0, len(images), batch_size)]  # fmt: skip
        return ((torch.cat(chunks) - self.shift) * self.scale).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample


def latent_space(config: dict, device: torch.device) -> LatentSpace | None:
    """The pipeline's VAE when it has a vae/ (the denoiser then works on latents), else None."""
    root = pipeline_of(config)
    if root is None or not (root / "vae" / "config.json").is_file():
        return None
    return LatentSpace(load_diffusers(root / "vae"), device)


def training_data(config: dict, model, cond: Conditioning, latents: LatentSpace | None = None):
    """The job's training images (encoded by `latents` when the pipeline has a VAE): a tensor for an
    unconditional model; for a conditioned one ConditionedImages with a caption (<name>.txt beside each image)
    or a class (<data>/<class>/<image>) per image."""
    from prunedm.data import ConditionedImages, DigitsDataset

    data, where = config["data"], f"data={config['data']}"
    channels, size = latent_shape(model)
    if latents is not None:
        size, channels = size * latents.factor, latents.channels
    encode = latents.encode if latents is not None else (lambda images: images)
    if cond.kind == "none":
        return encode(training_images(data, model, size, channels))
    if cond.kind == "class" and data == "digits":
        if cond.num_classes < 10:
            raise ConfigError(f"{where}: the digits have 10 classes, the {cond.model_name} only {cond.num_classes}")
        images = encode(training_images(data, model, size, channels))
        return ConditionedImages(images, cond.key, torch.arange(cond.num_classes), DigitsDataset("train").labels)
    folder = Path(data)
    if not folder.is_dir():
        what = "captioned images (<name>.txt beside each)" if cond.kind == "text" else "class folders"
        raise ConfigError(f"{where}: a {cond.model_name} is conditioned: data must be a folder of {what}")
    files = image_files(folder)
    if cond.kind == "text":
        captions = []
        for file in files:
            caption = file.with_suffix(".txt")
            if not caption.is_file():
                raise ConfigError(f"{where}: {file} has no caption {caption.name} beside it (a text-conditioned "
                                  f"{cond.model_name} trains on captioned images)")  # fmt: skip
            captions.append(caption.read_text(errors="replace").strip())
        distinct = list(dict.fromkeys(captions))
        tables = cond.encode(distinct)
        if cond.guidance_embeds:  # the guidance value a guidance-distilled Flux trains with (train_dreambooth_flux)
            tables["guidance"] = torch.full((len(distinct),), FLUX_GUIDANCE)
        index = {c: i for i, c in enumerate(distinct)}
        ids = torch.tensor([index[c] for c in captions])
        key, table = (tuple(tables), tuple(tables.values())) if len(tables) > 1 else (cond.key, tables[cond.key])
    else:
        names = []
        for file in files:
            parts = file.relative_to(folder).parts
            if len(parts) != 2:
                raise ConfigError(f"{where}: {file} is not in a class folder ({folder}/<class>/<image>)")
            names.append(parts[0])
        key, table = cond.key, torch.arange(cond.num_classes)
        ids = torch.tensor([cond.class_id(name, f"{where}: class folder {name!r}") for name in names])
    images = encode(folder_images(folder, size, channels, files))
    table = tuple(t.cpu() for t in table) if isinstance(key, tuple) else table.cpu()
    return ConditionedImages(images, key, table, ids)


def conditioned_data(config: dict, model, device: torch.device):
    """(the model's Conditioning, its training data: images, or images with their captions' embeddings or
    class labels), checked before any output is written."""
    cond = load_conditioning(config, model, device)
    if config["cond_dropout"] and cond.null() is None:
        raise ConfigError(f"cond_dropout={config['cond_dropout']}: the {cond.model_name} has no null condition "
                          "(unconditional, or class labels without a null class): set cond_dropout=0")  # fmt: skip
    return cond, training_data(config, model, cond, latent_space(config, device))


def training_dropout(model, cond: Conditioning, probability: float):
    """condition_dropout of cond's key to its null condition (a no-op for probability 0)."""
    return condition_dropout(model, cond.key, cond.null() if probability else None, probability)


def sampling_conditions(config: dict, cond: Conditioning) -> tuple[dict | None, dict | None, float]:
    """(per-sample conditions, the null condition or None, guidance scale) for sampling num_samples images
    from config's prompts or class_labels (cycled); ConfigError for keys that do not fit the model."""
    prompts, labels, scale = config["prompts"], config["class_labels"], config["guidance_scale"]
    name, count = cond.model_name, config["num_samples"]
    wrong = {"none": ("prompts", "class_labels"), "text": ("class_labels",), "class": ("prompts",)}[cond.kind]
    for key in wrong:
        if config[key] is not None:
            what = {"none": "unconditional", "text": "text-conditioned", "class": "class-conditioned"}[cond.kind]
            raise ConfigError(f"{key}={config[key]!r}: the {name} is {what}; drop {key}")
    if cond.kind == "none":
        if scale not in (None, 1.0):
            raise ConfigError(f"guidance_scale={scale}: the {name} is unconditional, nothing to guide; drop it")
        return None, None, 1.0
    if cond.kind == "text":
        if not prompts:
            raise ConfigError(f"the {name} is text-conditioned: set prompts=[...] (cycled over the samples)")
        values = cond.encode([prompts[i % len(prompts)] for i in range(count)])
        if cond.family == "flux":
            return _flux_conditions(values, scale, cond, count)
    else:
        ids = [cond.class_id(v, "class_labels") for v in labels] if labels else list(range(cond.num_classes))
        values = {cond.key: torch.tensor([ids[i % len(ids)] for i in range(count)])}
    null = cond.null()
    if scale is None:  # the pipeline's default, or no guidance where the model has no null condition
        scale = DEFAULT_GUIDANCE["sd3" if cond.family == "sd3" else cond.kind] if null is not None else 1.0
    if scale != 1.0 and null is None:
        raise ConfigError(f"guidance_scale={scale}: the {name} has no null class (its label embedding has no "
                          "'no class' row), so classifier-free guidance cannot run: set guidance_scale=1")  # fmt: skip
    nulls = dict(zip(cond.key, null)) if isinstance(cond.key, tuple) else {cond.key: null}
    return values, (nulls if scale != 1.0 else None), float(scale)


def _flux_conditions(values: dict, scale, cond: Conditioning, count: int) -> tuple[dict, None, float]:
    """A Flux transformer samples without classifier-free guidance, as FluxPipeline (true_cfg_scale 1): a
    guidance-distilled one (guidance_embeds) gets guidance_scale (default 3.5) as its guidance input."""
    if cond.guidance_embeds:
        values["guidance"] = torch.full((count,), float(FLUX_GUIDANCE if scale is None else scale))
    elif scale not in (None, 1.0):
        raise ConfigError(f"guidance_scale={scale}: the {cond.model_name} has no guidance embedding and FluxPipeline "
                          "runs no classifier-free guidance by default: drop guidance_scale")  # fmt: skip
    return values, None, 1.0


def flow_scheduler(config: dict):
    """The pipeline's FlowMatchEulerDiscreteScheduler (SD3, Flux), which sampling steps with (scheduler= names
    the DDPM-family samplers and does not apply), or None for another pipeline."""
    settings = scheduler_config(config)
    if settings is None:
        return None
    if _read_json(pipeline_of(config) / "scheduler" / "scheduler_config.json").get("_class_name") != (
        "FlowMatchEulerDiscreteScheduler"
    ):
        return None
    diffusers = optional_import("diffusers", "the flow-matching sampler")
    return diffusers.FlowMatchEulerDiscreteScheduler.from_config(settings)
