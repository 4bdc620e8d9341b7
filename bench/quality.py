"""The quality table: what pruning and 2:4 sparsity cost the shipped digits DDPM, at an equal finetune budget.

Every variant starts from prunedm/assets/digits-ddpm and is finetuned with the same steps, batch, lr,
EMA and seed; then it samples (DDIM) and is scored by FID on the digits classifier's features against
the digits data, the classifier's confident-recognition rate and the entropy of its predicted classes.
Sampling latency (one UNet forward, i.e. one denoising step, at --latency-batch on CPU) is measured
for all variants side by side at the end of the run, in interleaved rounds, as a ratio to dense.

    python -m bench.quality --out bench/results/quality [--quick] [--steps N] [--samples N] [--force]

Resumable: a variant whose out/variants/<name>.json exists is skipped (unless --force); models and
finetune checkpoints live under --work (default runs/quality), so an interrupted finetune resumes."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import prunedm
from prunedm._atomic import write_text_atomic
from prunedm.diffusion import denoising_loss as shared_denoising_loss
from prunedm.measure import layer_macs, time_ms

from .common import environment, save_figure, write_results

# From the package, so it is right both in a checkout (bench/) and installed (prunedm.bench).
ASSETS = Path(prunedm.__file__).resolve().parent / "assets"
DENSE_DIR = ASSETS / "digits-ddpm"
CHANNEL_IMPORTANCES = ("random", "magnitude", "taylor", "diff-pruning")
MASK_METHODS = ("magnitude", "maskllm", "maskpro")


@dataclass
class Budget:
    """What every variant gets: the same finetune (steps, batch, lr, EMA, seed) and the same evaluation."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-4
    ema_decay: float = 0.99  # the EMA horizon (~100 steps) must fit in a few hundred steps
    seed: int = 0
    ratio: float = 0.3  # channel pruning ratio (Diff-Pruning's CIFAR-10 setting)
    mask_steps: int = 100  # MaskLLM / MaskPro learning steps, before the finetune
    # MaskLLMLearner's default 5e-2 (the paper's, for thousands of steps) lets Adam's first steps undo the
    # magnitude prior in a short run: on the digits DDPM after 40 steps the final mask's loss was 0.110 at
    # 5e-2, 0.036 at 5e-3 and 0.035 at 5e-4, against 0.087 for magnitude 2:4.
    maskllm_lr: float = 5e-3
    samples: int = 256
    sample_steps: int = 50  # DDIM
    gradient_images: int = 32  # images of the Taylor / Diff-Pruning gradient pass
    gradient_timesteps: int = 40  # timesteps of that pass, evenly spaced over 0..999
    reference: int = 0  # 0: FID against all 1,797 digits; else a fixed subset of this many
    latency_batch: int = 64
    latency_rounds: int = 3
    latency_min_run_time: float = 0.5


QUICK = Budget(steps=1, batch_size=4, mask_steps=1, samples=40, sample_steps=2, gradient_images=4,
               gradient_timesteps=2, reference=100, latency_batch=2, latency_rounds=1,
               latency_min_run_time=0.005)  # fmt: skip


def variant_names() -> list[str]:
    """Every variant of the table, in table order."""
    names = ["dense"]
    names += [f"channels-{importance}" for importance in CHANNEL_IMPORTANCES]
    names += ["scratch-diff-pruning"]
    names += [f"2to4-{method}" for method in MASK_METHODS]
    names += ["channels-diff-pruning+2to4-magnitude"]
    return names


DESCRIPTIONS = {
    "dense": "dense, finetuned with the same budget",
    "channels-random": "channel pruning, random importance",
    "channels-magnitude": "channel pruning, magnitude (L2) importance",
    "channels-taylor": "channel pruning, Taylor importance (all gradient timesteps)",
    "channels-diff-pruning": "channel pruning, Diff-Pruning (Taylor over the informative timesteps)",
    "scratch-diff-pruning": "Diff-Pruning's architecture, re-initialised and trained from scratch",
    "2to4-magnitude": "2:4 by magnitude in every Linear/Conv2d",
    "2to4-maskllm": "2:4 learned by MaskLLM (Gumbel over patterns), then finetuned",
    "2to4-maskpro": "2:4 learned by MaskPro (REINFORCE on per-weight logits), then finetuned",
    "channels-diff-pruning+2to4-magnitude": "Diff-Pruning channels, then 2:4 by magnitude",
}


# Building the variants ------------------------------------------------------------------------------


# A variant name ending in this is the variant without it, finetuned with KD from the dense model.
KD_SUFFIX = "-kd"


def load_dense() -> nn.Module:
    """The shipped digits DDPM (a diffusers UNet2DModel)."""
    from diffusers import UNet2DModel

    if not (DENSE_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{DENSE_DIR} is missing; make it with `python scripts/train_digits_models.py`")
    return UNet2DModel.from_pretrained(DENSE_DIR)


def denoising_loss(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Noise-prediction MSE at random timesteps (global RNG, which the mask learners replay)."""
    from diffusers import DDPMScheduler

    return shared_denoising_loss(model, DDPMScheduler(num_train_timesteps=1000), images)


def prune_channels_variant(model: nn.Module, importance: str, images: torch.Tensor, budget: Budget) -> None:
    from prunedm import prune_channels

    data = None
    if importance in ("taylor", "diff-pruning"):
        data = [images[: budget.gradient_images]]
    stride = max(1, 1000 // budget.gradient_timesteps)
    prune_channels(model, importance=importance, ratio=budget.ratio, data=data, seed=budget.seed,
                   timesteps=range(0, 1000, stride)[: budget.gradient_timesteps])  # fmt: skip


def reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh default initialisation of every layer that has one (same structure, no learned weights)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def learn_masks(model: nn.Module, method: str, images: torch.Tensor, budget: Budget, progress: bool) -> None:
    """Put a 2:4 mask on every eligible Linear/Conv2d weight (zeros in place): by magnitude, or learned."""
    from prunedm import masks as pm
    from prunedm.train.mask_loop import learn_mask_steps

    if method == "magnitude":
        targets, _ = pm.find_targets(model)
        pm.apply_masks(model, pm.magnitude_masks(targets))
        return
    torch.manual_seed(budget.seed)
    if method == "maskllm":
        learner = pm.MaskLLMLearner(
            model, denoising_loss, total_steps=budget.mask_steps, mask_lr=budget.maskllm_lr, seed=budget.seed
        )
    elif method == "maskpro":
        learner = pm.MaskProLearner(model, denoising_loss, logit_init=10.0, mask_lr=50.0, seed=budget.seed)
    else:
        raise ValueError(f"mask method must be one of {MASK_METHODS}, got {method!r}")
    learn_mask_steps(learner, images, budget.mask_steps, budget.batch_size, budget.seed, progress=progress,
                     desc=f"learn-mask {method}")  # fmt: skip
    learner.finalize()


def build_variant(name: str, images: torch.Tensor, budget: Budget, progress: bool) -> nn.Module:
    """The variant's model before its finetune (pruned, masked or re-initialised)."""
    model = load_dense()
    if name == "dense":
        return model
    if name.startswith("channels-") or name.startswith("scratch-"):
        importance = name.split("-", 1)[1].split("+")[0]
        prune_channels_variant(model, importance, images, budget)
        if name.startswith("scratch-"):
            reinitialise(model, budget.seed)
        if "+2to4-" in name:
            learn_masks(model, name.split("+2to4-")[1], images, budget, progress)
        return model
    if name.startswith("2to4-"):
        learn_masks(model, name.removeprefix("2to4-"), images, budget, progress)
        return model
    raise ValueError(f"unknown variant {name!r}; known: {variant_names()}")


# Measuring ------------------------------------------------------------------------------------------


def example_inputs(model: nn.Module, batch: int) -> dict:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    return {"sample": sample, "timestep": torch.full((batch,), 500, dtype=torch.long)}


@torch.no_grad()
def effective_macs(model: nn.Module, macs: int) -> int:
    """MACs with the zero weights of Linear/Conv2d layers skipped (what 2:4 sparse tensor cores save)."""
    modules = dict(model.named_modules())
    per_layer = layer_macs(model.eval(), example_inputs(model, 1))
    saved = sum(macs_of * float((modules[name].weight == 0).float().mean()) for name, macs_of in per_layer.items())
    return int(round(macs - saved))


def count_model(model: nn.Module) -> dict:
    from prunedm.pruning import count_macs_and_params

    macs, params = count_macs_and_params(model.eval(), example_inputs(model, 1))
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {
        "params": int(params),
        "nonzero_params": nonzero,
        "macs": int(macs),
        "effective_macs": effective_macs(model, macs),
    }


def time_variants(models: dict[str, nn.Module], budget: Budget) -> dict[str, dict]:
    """Latency of one UNet forward per variant, interleaved rounds (load hits all alike); ratio to dense."""
    names = list(models)
    inputs = example_inputs(models[names[0]], budget.latency_batch)
    device = torch.device("cpu")

    def forward_of(model):
        model = model.eval()

        def forward():
            with torch.inference_mode():
                return model(**inputs).sample

        return forward

    forwards = {name: forward_of(model) for name, model in models.items()}
    rounds = []
    for _ in tqdm(range(budget.latency_rounds), desc="latency rounds", leave=False):
        rounds.append(
            {name: time_ms(fn, device, budget.latency_min_run_time)["median_ms"] for name, fn in forwards.items()}
        )
    out = {}
    for name in names:
        ratios = [r[name] / r["dense"] for r in rounds] if "dense" in models else [math.nan]
        out[name] = {
            "latency_ms": statistics.median(r[name] for r in rounds),
            "latency_ratio": statistics.median(ratios),
        }
    return out


# The run ---------------------------------------------------------------------------------------------


def run_variant(
    name: str, images: torch.Tensor, reference, budget: Budget, work: Path, out: Path, progress: bool
) -> dict:
    """Build, finetune, sample and score one variant; writes out/variants/<name>.json and its sample grid."""
    from diffusers import DDIMScheduler

    from prunedm import save_pretrained
    from prunedm.eval.fid import evaluate_samples
    from prunedm.eval.sampling import sample_images, save_grid
    from prunedm.train import FinetuneConfig, finetune

    started = time.perf_counter()
    torch.manual_seed(budget.seed)
    model = build_variant(name, images, budget, progress)
    sparse = "2to4" in name
    learned_mask = name.endswith(("2to4-maskllm", "2to4-maskpro"))
    final, final_loss = model.eval(), None  # 0 finetune steps: the variant as built (masks on frozen weights)
    if budget.steps:
        config = FinetuneConfig(
            steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, ema_decay=budget.ema_decay,
            seed=budget.seed, checkpoint_every=max(1, min(100, budget.steps)), keep_checkpoints=1,
            log_every=max(1, budget.steps // 20), progress=progress, keep_sparsity=sparse,
        )  # fmt: skip
        distill = None
        if name.endswith(KD_SUFFIX):  # output KD from the dense model (prunedm.train.distill's defaults)
            from prunedm.train.distill import DistillConfig

            distill = DistillConfig(teacher=load_dense().eval())
        result = finetune(model, images, work / name / "finetune", config, resume=True, distill=distill)
        final, final_loss = result.ema_model.eval(), result.final_loss
    save_pretrained(final, work / name / "model")
    counts = count_model(final)
    samples = sample_images(final, DDIMScheduler(num_train_timesteps=1000), budget.samples, budget.sample_steps,
                            seed=budget.seed)  # fmt: skip
    save_grid(samples[:64], out / "samples" / f"{name}.png", columns=8)
    scores = evaluate_samples(samples, reference)
    row = {
        "variant": name, "description": DESCRIPTIONS[name], **counts,
        "fid": scores["fid"], "classifier_accuracy": scores["classifier_accuracy"],
        "class_entropy": scores["class_entropy"], "num_samples": scores["num_samples"], "features": scores["features"],
        "finetune_steps": budget.steps, "mask_steps": budget.mask_steps if learned_mask else 0,
        "final_loss": final_loss, "sample_steps": budget.sample_steps,
        "channel_ratio": budget.ratio if "channels" in name or "scratch" in name else 0.0,
        "variant_seconds": time.perf_counter() - started, "budget": asdict(budget),
    }  # fmt: skip
    write_text_atomic(out / "variants" / f"{name}.json", json.dumps(row, indent=1) + "\n")
    return row


def reference_images(budget: Budget, size: int):
    """The FID reference: all digits at the model's size, or a fixed subset (quick runs)."""
    from prunedm.data import DigitsDataset

    images = DigitsDataset("all", size=size).images
    if budget.reference:
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[: budget.reference]]
    return images


COLUMNS = [
    ("variant", "variant", "{}"),
    ("params", "params", "{:,}"),
    ("nonzero_params", "non-zero params", "{:,}"),
    ("macs", "MACs", "{:,}"),
    ("effective_macs", "MACs (2:4 skipped)", "{:,}"),
    ("fid", "FID (digits clf.)", "{:.2f}"),
    ("classifier_accuracy", "clf. accuracy", "{:.3f}"),
    ("class_entropy", "class entropy", "{:.3f}"),
    ("latency_ratio", "latency / dense (CPU)", "{:.2f}"),
    ("finetune_steps", "finetune steps", "{}"),
    ("mask_steps", "mask steps", "{}"),
]


def markdown_table(rows: list[dict], env: dict, budget: Budget) -> str:
    """quality.md: the table, then how it was made."""

    def cell(row, key, fmt):
        value = row.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return fmt.format(value)

    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |" for row in rows]
    notes = [
        "# Quality of pruned / 2:4-sparse variants of the digits DDPM",
        "",
        *lines,
        "",
        f"Every variant: the shipped digits DDPM (prunedm/assets/digits-ddpm), then its pruning or mask, then "
        f"{budget.steps} finetune steps (batch {budget.batch_size}, lr {budget.lr}, EMA {budget.ema_decay}, seed "
        f"{budget.seed}; 2:4 variants keep their mask: keep_sparsity=True). Channel pruning ratio {budget.ratio}; "
        f"Taylor/Diff-Pruning gradients from {budget.gradient_images} images at {budget.gradient_timesteps} timesteps. "
        f"MaskLLM/MaskPro learn their masks for {budget.mask_steps} steps before the finetune.",
        "",
        f"FID: {budget.samples} DDIM samples ({budget.sample_steps} steps) against "
        f"{'all 1,797' if not budget.reference else budget.reference} digits, on the shipped digits classifier's 64-d "
        "features (prunedm.eval.fid through clean-fid). clf. accuracy: fraction of samples the classifier "
        "recognises with top-1 probability >= 0.9; class entropy: entropy (nats) of the predicted-class histogram "
        "(ln 10 = 2.303 is uniform).",
        "",
        f"Latency: one UNet forward (one denoising step) at batch {budget.latency_batch}, CPU, all variants timed "
        f"side by side in {budget.latency_rounds} interleaved rounds; median of per-round ratios to dense. 2:4 "
        "variants run here as dense weights holding zeros (no sparse kernels on CPU), so their ratio is ~1; "
        "'MACs (2:4 skipped)' is what sparse tensor cores would run.",
        "",
        f"Environment: {env.get('device')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
        f"commit {env.get('commit')}, {env.get('date')}.",
        "",
        "Regenerate: `python -m bench.quality --out bench/results/quality` (see --help for the budget flags).",
    ]
    return "\n".join(notes) + "\n"


def plot_quality(rows: list[dict], path: Path) -> Path | None:
    """FID and classifier accuracy per variant, as two bar charts in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.8), sharey=True)
    panels = (
        (axes[0], "fid", "FID (digits classifier features), lower is better"),
        (axes[1], "classifier_accuracy", "confidently recognised samples, higher is better"),
    )
    for ax, key, title in panels:
        values = [float(r[key]) for r in rows]
        ax.barh(range(len(rows)), values, color=["tab:gray" if n == "dense" else "tab:blue" for n in names])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    return save_figure(fig, path)


def budget_from_args(args) -> Budget:
    budget = QUICK if args.quick else Budget()
    flags = ("steps", "samples", "ratio", "mask_steps", "sample_steps", "batch_size", "maskllm_lr")
    overrides = {name: getattr(args, name) for name in flags}
    values = asdict(budget)
    values.update({k: v for k, v in overrides.items() if v is not None})
    budget = Budget(**values)
    if budget.steps < 1 or budget.batch_size < 1 or budget.sample_steps < 1:
        raise ValueError("--steps, --batch-size and --sample-steps must be >= 1")
    if budget.samples < 2:
        raise ValueError(f"--samples must be >= 2 (FID needs a covariance), got {budget.samples}")
    if not 0.0 < budget.ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {budget.ratio}")
    return budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/quality", help="directory for the table, plots and grids")
    parser.add_argument("--work", default=None, help="models and checkpoints (default runs/quality, quick: OUT/work)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget that only checks the pipeline")
    parser.add_argument("--steps", type=int, default=None, help="finetune steps of every variant")
    parser.add_argument("--samples", type=int, default=None, help="samples per variant for FID")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps")
    parser.add_argument("--mask-steps", type=int, default=None, help="MaskLLM/MaskPro learning steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--maskllm-lr", type=float, default=None, help="MaskLLM's mask learning rate (default 5e-3)")
    parser.add_argument("--ratio", type=float, default=None, help="channel pruning ratio (default 0.3)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of: {','.join(variant_names())}")
    parser.add_argument("--force", action="store_true", help="recompute variants whose result file exists")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        budget = budget_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    names = variant_names()
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            parser.error(f"--variants: unknown {unknown}; known: {names}")
        names = [n for n in names if n in chosen or n == "dense"]  # dense: the latency baseline
    out = Path(args.out)
    work = Path(args.work) if args.work else (out / "work" if args.quick else Path("runs/quality"))
    progress = not args.no_progress
    torch.manual_seed(budget.seed)

    from prunedm.data import DigitsDataset

    size = load_dense().config.sample_size
    images = DigitsDataset("train", size=size).images
    reference = reference_images(budget, size)
    rows = {}
    for name in tqdm(names, desc="variants", disable=not progress):
        result_path = out / "variants" / f"{name}.json"
        if result_path.exists() and not args.force:
            rows[name] = json.loads(result_path.read_text())
            if rows[name].get("budget") != asdict(budget):
                print(f"note: {result_path} was made with another budget; --force recomputes it")
            continue
        if args.force and (work / name).exists():
            shutil.rmtree(work / name)
        rows[name] = run_variant(name, images, reference, budget, work, out, progress)
        print(f"{name}: FID {rows[name]['fid']:.2f}, accuracy {rows[name]['classifier_accuracy']:.3f}, "
              f"{rows[name]['variant_seconds']:.0f} s")  # fmt: skip

    from prunedm.serialization import load_pretrained

    models = {n: load_pretrained(work / n / "model") for n in names if (work / n / "model").exists()}
    latency = time_variants(models, budget) if "dense" in models else {}
    ordered = []
    for n in names:
        row = {k: v for k, v in rows[n].items() if k != "budget"}
        if n in latency:
            row.update(latency[n])
        elif "latency_ratio" not in row:
            print(f"note: no model for {n} under {work}; its latency is missing (--force recomputes it)")
            row.update({"latency_ms": None, "latency_ratio": None})
        write_text_atomic(
            out / "variants" / f"{n}.json", json.dumps({**row, "budget": rows[n].get("budget")}, indent=1) + "\n"
        )
        ordered.append(row)
    env = {**environment(torch.device("cpu")), **package_versions(), "budget": asdict(budget)}
    json_path, csv_path = write_results(out, "quality", env, ordered)
    write_text_atomic(out / "quality.md", markdown_table(ordered, env, budget))
    plot_quality(ordered, out / "quality.png")
    print(markdown_table(ordered, env, budget))
    print(f"wrote {json_path}, {csv_path}, {out / 'quality.md'}, {out / 'quality.png'} and {out / 'samples'}/")
    return 0


def package_versions() -> dict:
    """Versions of the packages the table depends on, beyond torch."""
    from importlib import metadata

    versions = {}
    for package in ("diffusers", "torch-pruning", "clean-fid", "scikit-learn"):
        try:
            versions[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package.replace("-", "_")] = None
    return versions


if __name__ == "__main__":
    raise SystemExit(main())
