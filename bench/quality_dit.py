"""Depth pruning on the digits DiT (prunedm/assets/digits-dit): TinyFusion vs every-k vs Block Influence.

Each variant keeps half of the DiT's blocks, is finetuned with the same budget as bench.quality's variants
(class-conditional: every digit image with its label), samples DDIM images for the labels 0..9 in turn and is
scored by FID on the digits classifier's features. bench.quality_seeds runs these variants over seeds:

    python -m bench.quality_seeds --variants dit-dense,depth-every-k,depth-block-influence,depth-tinyfusion

Variants: dit-dense (finetuned with the same budget), depth-every-k (blocks 0, 2, 4, ...), depth-block-influence
(ShortGPT's Block Influence on noised digits), depth-tinyfusion (learned 1-of-2 per group, the official preset,
`mask_steps` steps; depth-tinyfusion-short: prunedm's short preset), dit-ecodiff (EcoDiff's structural gates on
every attention head and FFN unit, removed at keep ratio 0.5, see ecodiff_prune). diffusers' DiT conditions its
output head on block 0's embedder, so a variant that drops block 0 gets the next kept block's embedder there (the
finetune has to recover it)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

import prunedm
from prunedm._atomic import write_text_atomic

from . import quality

# The package's assets (bench is installed as prunedm.bench, so not a path relative to this file).
DIT_DIR = Path(prunedm.__file__).resolve().parent / "assets" / "digits-dit"
# 8 blocks, hidden 64 (4 heads x 16), patch 2 on the 16x16 digits: 64 tokens; class-conditional (DiT's adaLN-Zero
# with a label embedding of 10 digits plus the null class that label dropout trains).
DIT_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=8, sample_size=16,
    patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10,
)  # fmt: skip
DIT_VARIANTS = (
    "dit-dense", "depth-every-k", "depth-block-influence", "depth-tinyfusion", "depth-tinyfusion-short", "dit-ecodiff",
)  # fmt: skip
DESCRIPTIONS = {
    "dit-dense": "digits DiT, dense, finetuned with the same budget",
    "depth-every-k": "digits DiT, every 2nd block kept (0, 2, 4, ...)",
    "depth-block-influence": "digits DiT, the half of the blocks with the highest Block Influence (ShortGPT)",
    "depth-tinyfusion": "digits DiT, 1 of every 2 blocks learned by TinyFusion (official preset)",
    "depth-tinyfusion-short": "digits DiT, 1 of every 2 blocks learned by TinyFusion (prunedm's short preset)",
    "dit-ecodiff": "digits DiT, half of the heads and FFN units kept by EcoDiff's end-to-end gates (sdxl preset)",
}
# EcoDiff on the DiT. Keep ratio 0.5 of the heads and of the FFN units (ranked over all blocks, per kind, as the
# official code): the attention + FFN parameters and FLOPs the depth variants keep; the per-block adaLN
# embedders (~half of a block's parameters) are not gated, so this variant keeps more parameters than they do
# (the row's "params" says how many). The objective's chain is ECODIFF_CHAIN_STEPS DDIM steps (official: 50;
# the scored samples use 25) over one x_T per digit (the labels 0..9 every update, like the official fixed
# seed over a set of prompts), max(1, mask_steps // ECODIFF_STEP_DIVISOR) gate updates: the mask learning then
# costs about one depth variant's run at 100 finetune steps (official DiT config: 100 labels x 3 epochs at 4 per
# update = 75 updates of a 50-step chain). The batch being the same every update, the unpruned chain's final
# latents are computed once (equal to recomputing them).
ECODIFF_KEEP_RATIO = 0.5
ECODIFF_CHAIN_STEPS = 10
ECODIFF_STEP_DIVISOR = 4


def build_dit(seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised digits DiT (DIT_CONFIG, with overrides)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**DIT_CONFIG, **overrides})


def load_dit() -> nn.Module:
    """The shipped digits DiT."""
    from diffusers import DiTTransformer2DModel

    if not (DIT_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{DIT_DIR} is missing; make it with `python scripts/train_digits_models.py --dit`")
    return DiTTransformer2DModel.from_pretrained(DIT_DIR, torch_dtype=torch.float32)


def digits_data(size: int = 16, split: str = "train"):
    """The digits with their labels, as finetune's class-conditioned dataset ({"images", "class_labels"})."""
    from prunedm.data import DigitsDataset
    from prunedm.data.conditioned import ConditionedImages

    digits = DigitsDataset(split, size=size)
    return ConditionedImages(digits.images, "class_labels", torch.arange(10), digits.labels)


def _batches(data, batch_size: int, seed: int):
    """Endless random batches {"latents", "class_labels"} of `data` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        item = data[torch.randint(len(data), (batch_size,), generator=gen)]
        yield {"latents": item["images"], "class_labels": item["class_labels"]}


def depth_keep(name: str, model: nn.Module, data, budget: quality.Budget) -> list[int]:
    """The blocks variant `name` keeps (half of them, rounded down)."""
    from prunedm.pruning.depth import block_influence, keep_every, keep_most_influential
    from prunedm.pruning.tinyfusion import learn_depth_keep

    num = len(model.transformer_blocks)
    if name == "depth-every-k":
        return keep_every(num, 2)
    if name == "depth-block-influence":
        gen = torch.Generator().manual_seed(budget.seed)
        inputs = []
        for batch in [next(_batches(data, budget.batch_size, budget.seed)) for _ in range(2)]:
            t = torch.randint(0, 1000, (len(batch["latents"]),), generator=gen)
            noisy = batch["latents"] + torch.randn(batch["latents"].shape, generator=gen) * (t.view(-1, 1, 1, 1) / 1000)
            inputs.append({"hidden_states": noisy, "timestep": t, "class_labels": batch["class_labels"]})
        with torch.no_grad():
            return keep_most_influential(block_influence(model, inputs), num // 2)
    if name in ("depth-tinyfusion", "depth-tinyfusion-short"):
        batches = _batches(data, budget.batch_size, budget.seed)
        steps, preset = max(1, budget.mask_steps), "short" if name.endswith("-short") else "official"
        return learn_depth_keep(
            model, batches, group_size=2, keep_per_group=1, steps=steps, preset=preset, seed=budget.seed
        ).keep_indices
    depth = [v for v in DIT_VARIANTS if v.startswith("depth-")]
    raise ValueError(f"depth variant must be one of {depth}, got {name!r}")


def mask_steps(name: str, budget: quality.Budget) -> int:
    """The learning steps variant `name` takes before its finetune (0: none learned)."""
    if name == "dit-ecodiff":
        return ecodiff_steps(budget)
    return budget.mask_steps if "tinyfusion" in name else 0


def ecodiff_steps(budget: quality.Budget) -> int:
    """The gate updates dit-ecodiff takes for `budget` (see ECODIFF_STEP_DIVISOR)."""
    return max(1, budget.mask_steps // ECODIFF_STEP_DIVISOR)


def ecodiff_prune(model: nn.Module, budget: quality.Budget, keep_ratio: float = ECODIFF_KEEP_RATIO):
    """EcoDiff (prunedm.structural.EcoDiffLearner, preset "sdxl": end-to-end final latent, time-step gradient
    checkpointing, masking_eps 0.5, L1, AdamW 0.1) on every attention head and FFN unit of `model`, then the
    units outside keep_ratio (ranked by logit) physically removed. Returns the StructuralPruningReport."""
    from prunedm.structural import EcoDiffLearner

    class FixedBatchEcoDiff(EcoDiffLearner):
        reference = None

        def reference_latents(self, batch):
            if self.reference is None:  # the same batch and x_T every update
                self.reference = super().reference_latents(batch)
            return self.reference

    learner = FixedBatchEcoDiff(model, preset="sdxl", num_inference_steps=ECODIFF_CHAIN_STEPS, seed=budget.seed,
                                sample_seed=budget.seed, total_steps=ecodiff_steps(budget))  # fmt: skip
    size = model.config.sample_size
    batch = {"latents": torch.zeros(10, model.config.in_channels, size, size), "class_labels": torch.arange(10)}
    for _ in range(ecodiff_steps(budget)):
        learner.step(batch)
    return learner.apply(keep_ratio=keep_ratio)


def build_variant(name: str, data, budget: quality.Budget, model: nn.Module | None = None) -> nn.Module:
    """The variant's model before its finetune: the digits DiT (or `model`), depth-pruned unless dit-dense,
    structurally pruned by dit-ecodiff."""
    from prunedm.pruning.depth import prune_depth

    model = load_dit() if model is None else model
    if name == "dit-dense":
        return model
    torch.manual_seed(budget.seed)
    if name == "dit-ecodiff":
        ecodiff_prune(model, budget)
        return model
    prune_depth(model, depth_keep(name, model, data, budget))
    return model


def kept_units(model: nn.Module) -> dict:
    """{"heads", "ffn_units"}: the attention heads and FFN hidden units left in `model`."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    return {
        "heads": sum(m.heads for m in model.modules() if isinstance(m, Attention)),
        "ffn_units": sum(m.net[2].in_features for m in model.modules() if isinstance(m, FeedForward)),
    }


_DATA: dict = {}


def run(name: str, budget: quality.Budget, out: Path, work: Path) -> dict:
    """Build, finetune, sample and score one DiT variant; writes out/variants/<name>.json (bench.quality_seeds'
    runner for the DiT variants)."""
    from diffusers import DDIMScheduler

    from prunedm.eval.fid import evaluate_samples
    from prunedm.eval.sampling import sample_images, save_grid
    from prunedm.train import FinetuneConfig, finetune

    if not _DATA:
        _DATA["train"] = digits_data()
        _DATA["reference"] = quality.reference_images(budget, 16)
    started = time.perf_counter()
    torch.manual_seed(budget.seed)
    model = build_variant(name, _DATA["train"], budget)
    config = FinetuneConfig(steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, ema_decay=budget.ema_decay,
                            seed=budget.seed, checkpoint_every=max(1, min(100, budget.steps)), keep_checkpoints=1,
                            log_every=max(1, budget.steps // 20), progress=False)  # fmt: skip
    result = finetune(model, _DATA["train"], work / name / "finetune", config, resume=True)
    final = result.ema_model.eval()
    labels = torch.arange(budget.samples) % 10
    samples = sample_images(final, DDIMScheduler(num_train_timesteps=1000), budget.samples, budget.sample_steps,
                            seed=budget.seed, conditions={"class_labels": labels})  # fmt: skip
    save_grid(samples[:64], out / "samples" / f"{name}.png", columns=8)
    scores = evaluate_samples(samples, _DATA["reference"])
    row = {
        "variant": name, "description": DESCRIPTIONS[name], "depth": len(final.transformer_blocks),
        "params": sum(p.numel() for p in final.parameters()), "fid": scores["fid"],
        "classifier_accuracy": scores["classifier_accuracy"], "class_entropy": scores["class_entropy"],
        "num_samples": scores["num_samples"], "finetune_steps": budget.steps,
        "mask_steps": mask_steps(name, budget),
        "final_loss": result.final_loss,
        "sample_steps": budget.sample_steps, "variant_seconds": time.perf_counter() - started, "budget": asdict(budget),
        **kept_units(final),
    }  # fmt: skip
    write_text_atomic(out / "variants" / f"{name}.json", json.dumps(row, indent=1) + "\n")
    return row
