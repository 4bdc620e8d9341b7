"""The text encoders and tokenizers of a local diffusers pipeline dir (text_encoder/ + tokenizer/; an SD3's, Flux's
or SDXL's second and T5 ones), built from concrete transformers classes, local-only, from safetensors, their
sizes checked against the weights and the denoiser before anything is loaded; and the dir's JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prunedm._optional import optional_import
from prunedm.cli.config import ConfigError
from prunedm.cli.models import check_weights
from prunedm.conditioning import JointTextEncoder, TextEncoder
from prunedm.serialization import check_config, read_safetensors_header

MAX_JSON_BYTES = 16 << 20  # a pipeline's JSON files (configs, id2label, tokenizer.json of CLIP is 2 MB)
# Text encoders and tokenizers built from their concrete classes (never Auto classes, so no code in the dir runs).
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_ENCODERS, T5_TOKENIZERS = ("T5EncoderModel",), ("T5TokenizerFast", "T5Tokenizer")  # one class in transformers 5
# The parts of the pipelines with several text encoders (SD3, Flux, SDXL): (encoder dir, tokenizer dir, encoder
# classes, tokenizer classes), CLIPs first, T5 last.
JOINT_PARTS = {
    "sd3": [("text_encoder", "tokenizer", ("CLIPTextModelWithProjection",), TOKENIZERS),
            ("text_encoder_2", "tokenizer_2", ("CLIPTextModelWithProjection",), TOKENIZERS),
            ("text_encoder_3", "tokenizer_3", T5_ENCODERS, T5_TOKENIZERS)],
    "flux": [("text_encoder", "tokenizer", ("CLIPTextModel",), TOKENIZERS),
             ("text_encoder_2", "tokenizer_2", T5_ENCODERS, T5_TOKENIZERS)],
    "sdxl": [("text_encoder", "tokenizer", ("CLIPTextModel",), TOKENIZERS),
             ("text_encoder_2", "tokenizer_2", ("CLIPTextModelWithProjection",), TOKENIZERS)],
}  # fmt: skip
SDXL_TIME_IDS = 6  # original size, crop top-left, target size


def read_json(file: Path) -> dict:
    """A pipeline dir's JSON file (a config, model_index.json), size-capped and checked; ConfigError if not one."""
    if file.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(f"{file} is larger than {MAX_JSON_BYTES} bytes: not a pipeline config")
    try:
        data = json.loads(file.read_text())
        check_config(data, file, file.name)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError(f"{file} is not a valid config: {exc}") from None
    return data


def text_encoder(root: Path, model_name: str, device: torch.device) -> TextEncoder:
    for part in (root / "text_encoder", root / "tokenizer"):
        if not part.is_dir():
            raise ConfigError(f"pipeline {root}: no {part.name}/; a {model_name} is text-conditioned and needs "
                              "text_encoder/ and tokenizer/ beside its unet/")  # fmt: skip
    encoder = _load_encoder(root / "text_encoder", TEXT_ENCODERS)
    return TextEncoder(_load_tokenizer(root / "tokenizer", TOKENIZERS), encoder, device)


def joint_encoder(root: Path, model, family: str, device: torch.device) -> JointTextEncoder:
    """An SD3's CLIP-L, CLIP-G and optional T5, a Flux's CLIP and T5, or an SDXL's two CLIPs, with their tokenizers,
    their widths checked against the denoiser's before any is loaded."""
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
    joint = model.config.get("joint_attention_dim")
    problems = (_sdxl_problems(model.config, configs) if family == "sdxl"
                else _mmdit_problems(family, model.config, configs, t5))  # fmt: skip
    if problems:
        raise ConfigError(f"pipeline {root}: its text encoders do not fit the {name}: {'; '.join(problems)}")
    loaded = [(_load_tokenizer(t, tokenizers), _load_encoder(e, classes)) for e, t, classes, tokenizers in found]
    return JointTextEncoder(family, loaded[: len(configs)], loaded[-1] if t5 is not None else None, joint, device)


def _mmdit_problems(family: str, config, configs: list[dict], t5: dict | None) -> list[str]:
    joint, pooled = config.joint_attention_dim, config.pooled_projection_dim
    widths = [c.get("projection_dim") if family == "sd3" else c.get("hidden_size") for c in configs]
    problems = []
    if t5 is not None and t5.get("d_model") != joint:
        problems.append(f"T5 d_model {t5.get('d_model')} != joint_attention_dim {joint}")
    if family == "sd3" and sum(c.get("hidden_size") or 0 for c in configs) > joint:
        problems.append(f"the CLIP widths {[c.get('hidden_size') for c in configs]} exceed joint_attention_dim {joint}")
    if sum(w or 0 for w in widths) != pooled:
        problems.append(f"the CLIP pooled widths {widths} do not add up to pooled_projection_dim {pooled}")
    return problems


def _sdxl_problems(config, configs: list[dict]) -> list[str]:
    """An SDXL UNet takes both encoders' hidden states side by side (cross_attention_dim) and encoder 2's
    projection beside 6 time-id embeddings (projection_class_embeddings_input_dim)."""
    cross = config.cross_attention_dim
    cross = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    widths = [c.get("hidden_size") for c in configs]
    added = config.get("projection_class_embeddings_input_dim")
    projection, time_dim = configs[1].get("projection_dim"), config.get("addition_time_embed_dim") or 0
    problems = []
    if cross != {sum(w or 0 for w in widths)}:
        problems.append(f"the CLIP widths {widths} do not add up to cross_attention_dim {config.cross_attention_dim}")
    if (projection or 0) + SDXL_TIME_IDS * time_dim != added:
        problems.append(f"text_encoder_2's projection_dim {projection} + {SDXL_TIME_IDS} x addition_time_embed_dim "
                        f"{time_dim} != projection_class_embeddings_input_dim {added} (an SDXL refiner, which takes an "
                        "aesthetic score, is not supported)")  # fmt: skip
    return problems


def _encoder_config(encoder_dir: Path, classes: tuple[str, ...]) -> dict:
    file = encoder_dir / "config.json"
    if not file.is_file():
        raise ConfigError(f"{encoder_dir}: no config.json (a {' or '.join(classes)} saved by transformers)")
    config = read_json(file)
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
    kind = read_json(tokenizer_config).get("tokenizer_class") if tokenizer_config.is_file() else None
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
