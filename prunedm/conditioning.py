"""What a diffusion model is conditioned on, and the pieces classifier-free guidance needs: text embeddings
(a tokenizer + text encoder, cached per prompt), class labels and their null class, condition dropout.

Foundation layer: the CLI, sampling and training use it; it imports nothing of prunedm above it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Models whose forward takes text embeddings (encoder_hidden_states) or class labels (class_labels); the MMDiTs
# (SD3, Flux) also take pooled projections of the prompt, an SDXL UNet (addition_embed_type "text_time") pooled
# text embeds and size/crop time ids.
TEXT_MODELS = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
JOINT_TEXT_MODELS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# T5 prompt lengths of StableDiffusion3Pipeline and FluxPipeline (max_sequence_length defaults).
T5_LENGTH = {"sd3": 256, "flux": 512}
# The families whose prompts go through several text encoders, and the model inputs their two outputs feed.
JOINT_FAMILIES = {
    "sd3": ("encoder_hidden_states", "pooled_projections"),
    "flux": ("encoder_hidden_states", "pooled_projections"),
    "sdxl": ("encoder_hidden_states", "text_embeds"),
}
CLASS_MODELS = ("DiTTransformer2DModel",)
CONDITION_KEYS = {"text": "encoder_hidden_states", "class": "class_labels"}


def conditioning_kind(model: nn.Module) -> str:
    """What `model` is conditioned on: "text", "class" or "none". ValueError for a model class whose
    conditioning prunedm does not supply (another transformer that needs pooled projections)."""
    kinds = {c.__name__ for c in type(model).__mro__}
    if kinds & set(TEXT_MODELS):
        return "text"
    if kinds & set(CLASS_MODELS):
        return "class"
    if "UNet2DModel" in kinds:
        return "class" if getattr(model.config, "num_class_embeds", None) else "none"
    if hasattr(getattr(model, "config", None), "get") and any(
        model.config.get(k) is not None for k in ("joint_attention_dim", "pooled_projection_dim")
    ):
        raise ValueError(
            f"{type(model).__name__} needs text embeddings and pooled projections: conditioning is supported for "
            f"{', '.join(TEXT_MODELS + CLASS_MODELS)} and UNet2DModel"
        )
    return "none"


def text_family(model: nn.Module) -> str:
    """How a text-conditioned model's prompts are encoded: "sd3" or "flux" (joint CLIP + T5 embeddings and
    pooled projections), "sdxl" (a UNet2DConditionModel with addition_embed_type "text_time": two CLIP encoders'
    embeddings, pooled text embeds and time ids), else "clip" (one CLIP text encoder's last hidden state)."""
    kinds = {c.__name__ for c in type(model).__mro__}
    if "UNet2DConditionModel" in kinds and model.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return next((family for name, family in JOINT_TEXT_MODELS.items() if name in kinds), "clip")


def sdxl_time_ids(resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning [original height, width, crop top, left, target height, width] of an uncropped
    square image of `resolution` pixels: (r, r, 0, 0, r, r), what StableDiffusionXLPipeline passes by default and
    diffusers' train_text_to_image_sdxl for an image neither resized nor cropped."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


def num_classes(model: nn.Module) -> int | None:
    """The number of class labels a class-conditioned model takes (labels 0 .. n-1)."""
    config = model.config
    return config.get("num_embeds_ada_norm") or config.get("num_class_embeds")


def null_class(model: nn.Module) -> int | None:
    """The label id that stands for "no class" (classifier-free guidance's unconditional branch): num_classes
    when every label embedding table of `model` has that extra row (diffusers' LabelEmbedding with
    dropout_prob > 0, as DiT is trained and as DiTPipeline guides), else None."""
    count = num_classes(model)
    tables = [m.embedding_table for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
    if count is None or not tables or any(t.num_embeddings != count + 1 for t in tables):
        return None
    return count


class TextEncoder:
    """Prompts -> text embeddings [N, L, D] as StableDiffusionPipeline makes them (padded to the tokenizer's
    max length, the encoder's last hidden state), under no_grad, each distinct prompt encoded once."""

    def __init__(self, tokenizer, text_encoder: nn.Module, device: torch.device | str = "cpu"):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.to(device).eval().requires_grad_(False)
        limit = getattr(text_encoder.config, "max_position_embeddings", None) or 77
        self.max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        self.device = torch.device(device)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            ids = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids  # fmt: skip
            embeddings = self.text_encoder(ids.to(self.device))[0]
            self._cache.update(zip(chunk, embeddings))
        return torch.stack([self._cache[p] for p in prompts])

    def null(self) -> torch.Tensor:
        """The empty prompt's embedding [1, L, D]: the unconditional branch of guidance, and what condition
        dropout puts in a dropped sample's place."""
        return self([""])


def _max_length(tokenizer, encoder: nn.Module, default: int) -> int:
    limit = getattr(encoder.config, "max_position_embeddings", None) or default
    return min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)


class JointTextEncoder:
    """Prompts -> {"encoder_hidden_states": [N, L, D], "pooled_projections": [N, P]} as the MMDiT pipelines'
    encode_prompt builds them ("text_embeds" in place of "pooled_projections" for sdxl), under no_grad, each
    distinct prompt encoded once.

    sd3 (StableDiffusion3Pipeline): CLIP-L and CLIP-G (CLIPTextModelWithProjection) penultimate hidden states
    concatenated on features, zero-padded to T5's width, then T5's last hidden state appended on the sequence
    (zeros [N, t5_length, joint_dim] without T5, as diffusers does); pooled = both projections concatenated.
    flux (FluxPipeline): pooled = the CLIPTextModel's pooler_output, sequence = T5's last hidden state.
    sdxl (StableDiffusionXLPipeline): the CLIPTextModel's and CLIPTextModelWithProjection's penultimate hidden
    states concatenated on features (each tokenizer's own length); pooled = encoder 2's projection (text_embeds)."""

    def __init__(self, family: str, clips: list, t5, joint_dim: int | None, device: torch.device | str = "cpu"):
        if family not in JOINT_FAMILIES:
            raise ValueError(f"family must be one of {', '.join(JOINT_FAMILIES)}, got {family!r}")
        self.family, self.joint_dim, self.device = family, joint_dim, torch.device(device)
        self.keys = JOINT_FAMILIES[family]
        self.clips = [(tok, enc.to(device).eval().requires_grad_(False)) for tok, enc in clips]
        self.t5 = None if t5 is None else (t5[0], t5[1].to(device).eval().requires_grad_(False))
        self.clip_length = _max_length(clips[0][0], clips[0][1], 77)  # the MMDiT pipelines use tokenizer 1's length
        self.lengths = [_max_length(tok, enc, 77) if family == "sdxl" else self.clip_length for tok, enc in clips]
        self.t5_length = T5_LENGTH.get(family)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tokens(self, tokenizer, prompts: list[str], length: int) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)  # fmt: skip

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        if self.t5 is None:
            return torch.zeros(len(prompts), self.t5_length, self.joint_dim, device=self.device)
        tokenizer, encoder = self.t5
        return encoder(self._tokens(tokenizer, prompts, self.t5_length))[0]

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.family == "flux":
            tokenizer, encoder = self.clips[0]
            pooled = encoder(self._tokens(tokenizer, prompts, self.clip_length), output_hidden_states=False)
            return self._t5(prompts), pooled.pooler_output
        sequences, pooled = [], []
        for (tokenizer, encoder), length in zip(self.clips, self.lengths):
            out = encoder(self._tokens(tokenizer, prompts, length), output_hidden_states=True)
            sequences.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(sequences, dim=-1)
        if self.family == "sdxl":
            return clip, pooled[-1]
        t5 = self._t5(prompts)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    @torch.no_grad()
    def __call__(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            sequence, pooled = self._encode(chunk)
            self._cache.update(zip(chunk, zip(sequence, pooled)))
        return {key: torch.stack([self._cache[p][i] for p in prompts]) for i, key in enumerate(self.keys)}

    def null(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embeddings (one sample): SD3's classifier-free guidance branch (negative prompt
        "" through every encoder; SDXL's where force_zeros_for_empty_prompt is off), and what condition dropout
        puts in a dropped sample's place (train_text_to_image_sdxl's empty prompts)."""
        return self([""])


@contextlib.contextmanager
def condition_dropout(model: nn.Module, key, null, probability: float) -> Iterator[None]:
    """While active, each forward of `model` replaces each sample's `key` condition (encoder_hidden_states or
    class_labels; or a tuple of keys with a tuple of nulls, e.g. an MMDiT's embeddings and pooled projections, an
    SDXL UNet's embeddings and text_embeds (in added_cond_kwargs), dropped together) by `null` with `probability`
    (training for classifier-free guidance). The draw is one
    torch.rand per sample on the global CPU RNG, which finetune re-seeds every step and the mask learners
    checkpoint and replay, so resumed runs stay exact; probability 0 draws nothing."""
    if probability == 0:
        yield
        return
    keys, nulls = (key, null) if isinstance(key, tuple) else ((key,), (null,))
    active = [True]  # copies of the model (an EMA's deepcopy) share this hook: it goes inert with the block

    def drop(module, args, kwargs):
        if kwargs.get(keys[0]) is None or not active[0]:
            return None
        dropped = torch.rand(kwargs[keys[0]].shape[0]) < probability
        added = dict(kwargs.get("added_cond_kwargs") or {})  # an SDXL UNet's pooled text embeds come in there
        for name, fill in zip(keys, nulls):
            where = kwargs if name in kwargs else added
            value = where[name]
            fill = fill.to(value.device, value.dtype)  # [1, ...] or a 0-dim class id: broadcast over the batch
            where[name] = torch.where(dropped.to(value.device).view(-1, *([1] * (value.dim() - 1))), fill, value)
        if added:
            kwargs["added_cond_kwargs"] = added
        return args, kwargs

    handle = model.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        yield
    finally:
        active[0] = False
        handle.remove()
