"""What a diffusion model is conditioned on, and the pieces classifier-free guidance needs: text embeddings
(a tokenizer + text encoder, cached per prompt), class labels and their null class, condition dropout.

Foundation layer: the CLI, sampling and training use it; it imports nothing of prunedm above it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Models whose forward takes text embeddings (encoder_hidden_states) or class labels (class_labels).
TEXT_MODELS = ("UNet2DConditionModel",)
CLASS_MODELS = ("DiTTransformer2DModel",)
CONDITION_KEYS = {"text": "encoder_hidden_states", "class": "class_labels"}


def conditioning_kind(model: nn.Module) -> str:
    """What `model` is conditioned on: "text", "class" or "none". ValueError for a model class whose
    conditioning prunedm does not supply (e.g. SD3/Flux transformers, which also need pooled projections)."""
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


@contextlib.contextmanager
def condition_dropout(model: nn.Module, key: str, null: torch.Tensor, probability: float) -> Iterator[None]:
    """While active, each forward of `model` replaces each sample's `key` condition (encoder_hidden_states or
    class_labels) by `null` with `probability` (training for classifier-free guidance). The draw is one
    torch.rand per sample on the global CPU RNG, which finetune re-seeds every step and the mask learners
    checkpoint and replay, so resumed runs stay exact; probability 0 draws nothing."""
    if probability == 0:
        yield
        return

    active = [True]  # copies of the model (an EMA's deepcopy) share this hook: it goes inert with the block

    def drop(module, args, kwargs):
        value = kwargs.get(key)
        if value is None or not active[0]:
            return None
        dropped = (torch.rand(value.shape[0]) < probability).to(value.device)
        fill = null.to(value.device, value.dtype)  # [1, L, D] or a 0-dim class id: broadcast over the batch
        kwargs[key] = torch.where(dropped.view(-1, *([1] * (value.dim() - 1))), fill, value)
        return args, kwargs

    handle = model.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        yield
    finally:
        active[0] = False
        handle.remove()
