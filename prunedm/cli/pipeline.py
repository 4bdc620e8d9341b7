"""Conditioning for the CLI jobs: the parts of a local diffusers pipeline dir that condition its denoiser
(text encoders through prunedm.cli.text_encoders, scheduler/, vae/, a DiT's id2label and an SDXL's
force_zeros_for_empty_prompt in model_index.json), and the conditioned training data and sampling conditions a
job's config asks for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunedm._optional import optional_import
from prunedm.cli.config import ConfigError
from prunedm.cli.models import (
    folder_images,
    image_files,
    load_diffusers,
    pipeline_denoiser,
    training_images,
)
from prunedm.cli.text_encoders import joint_encoder, read_json, text_encoder
from prunedm.conditioning import (
    CONDITION_KEYS,
    JOINT_FAMILIES,
    JointTextEncoder,
    TextEncoder,
    condition_dropout,
    conditioning_kind,
    null_class,
    num_classes,
    sdxl_time_ids,
    text_family,
)
from prunedm.diffusion import latent_shape

# A Flux transformer with guidance_embeds (guidance-distilled, FLUX.1-dev) gets the guidance value, not CFG:
# 3.5 as FluxPipeline samples and diffusers' train_dreambooth_flux trains with.
FLUX_GUIDANCE = 3.5
# Guidance scale when the config leaves it null: StableDiffusionPipeline's 7.5, DiTPipeline's 4.0,
# StableDiffusion3Pipeline's 7.0, StableDiffusionXLPipeline's 5.0.
DEFAULT_GUIDANCE = {"text": 7.5, "class": 4.0, "none": 1.0, "sd3": 7.0, "sdxl": 5.0}


@dataclass
class Conditioning:
    """What the job's model is conditioned on, and where the conditions come from."""

    kind: str  # none | text | class
    model_name: str  # the model's class name, for messages
    encoder: TextEncoder | JointTextEncoder | None = None
    family: str = "clip"  # a text model's prompt encoding: clip | sd3 | flux | sdxl
    guidance_embeds: bool = False  # a Flux transformer that takes the guidance value
    time_ids: torch.Tensor | None = None  # an SDXL UNet's [6] size/crop ids at the job's resolution
    zero_negative: bool = False  # SDXL's force_zeros_for_empty_prompt: guidance's null embeddings are zeros
    num_classes: int | None = None
    null_class: int | None = None
    labels: dict[str, int] = field(default_factory=dict)  # class names (id2label, lower case) -> ids

    @property
    def key(self) -> str | tuple[str, ...] | None:
        """The model's condition key, or for an SD3/Flux transformer or an SDXL UNet its keys (embeddings, pooled
        projections or text_embeds): what condition dropout drops."""
        return JOINT_FAMILIES[self.family] if self.family != "clip" else CONDITION_KEYS.get(self.kind)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{key: per-prompt condition} for a text-conditioned model."""
        out = self.encoder(prompts)
        return out if isinstance(out, dict) else {self.key: out}

    def null(self):
        """One sample's null condition (the empty prompt's embeddings, a tuple along `key` for SD3/Flux/SDXL; the
        null class), or None when the model has none."""
        if self.kind == "text":
            null = self.encoder.null()
            return tuple(null[k] for k in self.key) if isinstance(null, dict) else null
        if self.kind == "class" and self.null_class is not None:
            return torch.tensor(self.null_class)
        return None

    def fixed(self, count: int) -> dict[str, torch.Tensor]:
        """The inputs every sample gets alike, `count` rows: an SDXL UNet's time ids."""
        return {} if self.time_ids is None else {"time_ids": self.time_ids.expand(count, -1).clone()}

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
        if family == "sdxl":
            return _sdxl_conditioning(root, model, device)
        if family != "clip":
            encoder = joint_encoder(root, model, family, device)
            return Conditioning(kind, name, encoder=encoder, family=family,
                                guidance_embeds=bool(model.config.get("guidance_embeds")))  # fmt: skip
        return Conditioning(kind, name, encoder=text_encoder(root, name, device))
    if kind == "class":
        labels = {}
        if root is not None and (root / "model_index.json").is_file():
            labels = _labels(read_json(root / "model_index.json").get("id2label") or {}, root)
        return Conditioning(kind, name, num_classes=num_classes(model), null_class=null_class(model), labels=labels)
    return Conditioning(kind, name)


def _sdxl_conditioning(root: Path, model, device: torch.device) -> Conditioning:
    """An SDXL UNet's: both CLIP encoders, time ids of an uncropped image at the resolution the job trains and
    samples at (sample_size times the VAE's scale, StableDiffusionXLPipeline's default height and width), and
    model_index.json's force_zeros_for_empty_prompt (StableDiffusionXLPipeline's default True when absent)."""
    vae = root / "vae" / "config.json"
    factor = vae_factor(read_json(vae)) if vae.is_file() else 1  # without a VAE the UNet denoises pixels
    index = root / "model_index.json"
    zeros = read_json(index).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
    return Conditioning("text", type(model).__name__, encoder=joint_encoder(root, model, "sdxl", device),
                        family="sdxl", time_ids=sdxl_time_ids(latent_shape(model)[1] * factor),
                        zero_negative=bool(zeros))  # fmt: skip


def vae_factor(vae_config) -> int:
    """Pixels per latent of a VAE config, as diffusers' pipelines compute vae_scale_factor."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _labels(id2label: dict, root: Path) -> dict[str, int]:
    """Class names -> ids from DiTPipeline's id2label ("207": "golden retriever", ...; comma-separated synonyms)."""
    labels = {}
    for key, value in id2label.items() if isinstance(id2label, dict) else ():
        if not (str(key).isdigit() and isinstance(value, str)):
            raise ConfigError(f"{root / 'model_index.json'}: id2label must map ids to names, got {key!r}: {value!r}")
        for synonym in value.split(","):
            labels.setdefault(synonym.strip().lower(), int(key))
    return labels


def scheduler_config(config: dict) -> dict | None:
    """The pipeline's scheduler/scheduler_config.json (betas, timesteps, prediction type), or None."""
    root = pipeline_of(config)
    file = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if file is None or not file.is_file():
        return None
    return {k: v for k, v in read_json(file).items() if not k.startswith("_")}


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
        self.factor = vae_factor(config)
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
        tables = {**cond.encode(distinct), **cond.fixed(len(distinct))}
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
        values = {**cond.encode([prompts[i % len(prompts)] for i in range(count)]), **cond.fixed(count)}
        if cond.family == "flux":
            return _flux_conditions(values, scale, cond, count)
    else:
        ids = [cond.class_id(v, "class_labels") for v in labels] if labels else list(range(cond.num_classes))
        values = {cond.key: torch.tensor([ids[i % len(ids)] for i in range(count)])}
    null = cond.null()
    if null is not None and cond.zero_negative:  # StableDiffusionXLPipeline's force_zeros_for_empty_prompt
        null = tuple(torch.zeros_like(n) for n in null)
    if scale is None:  # the pipeline's default, or no guidance where the model has no null condition
        scale = DEFAULT_GUIDANCE.get(cond.family, DEFAULT_GUIDANCE[cond.kind]) if null is not None else 1.0
    if scale != 1.0 and null is None:
        raise ConfigError(f"guidance_scale={scale}: the {name} has no null class (its label embedding has no "
                          "'no class' row), so classifier-free guidance cannot run: set guidance_scale=1")  # fmt: skip
    nulls = dict(zip(cond.key, null)) if isinstance(cond.key, tuple) else {cond.key: null}
    nulls.update(cond.fixed(1))  # the negative time ids are the positive ones, as SDXL's pipeline passes them
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
    if read_json(pipeline_of(config) / "scheduler" / "scheduler_config.json").get("_class_name") != (
        "FlowMatchEulerDiscreteScheduler"
    ):
        return None
    diffusers = optional_import("diffusers", "the flow-matching sampler")
    return diffusers.FlowMatchEulerDiscreteScheduler.from_config(settings)
