"""The quality table over several seeds: mean, spread, and which differences to a baseline exceed the spread.

Each (variant, seed, budget) is one run of bench.quality's pipeline (build, finetune, DDIM samples, FID on the
digits classifier's features) with that seed as the finetune / mask / sampling seed and that many finetune
steps. Runs are resumable: out/runs/steps-B/seed-S/variants/<variant>.json is skipped when it exists.
Budgets run in ascending order and share work: a (variant, seed) is built once (work/built/) and every budget
starts from that model; a longer finetune continues the shorter one's checkpoint (constant lr, step-keyed RNG:
the same weights as a run from scratch, tested). Budget 0 scores the variant as built: learned masks on frozen
weights, the protocol of MaskLLM's and MaskPro's own evaluations.

    python -m bench.quality_seeds --out bench/results/quality-seeds [--variants a,b] [--seeds 0,1,2]
        [--budgets 0,100,400] [--samples 1000] [--sample-steps 25] [--readme README.md]

Spread rule: a variant's FID differs from its baseline (magnitude 2:4 for masks, magnitude channels for
channel pruning, every-k for depth) beyond the seed spread when |mean difference| > std(variant) + std(baseline),
with at least 2 seeds on each side (sample standard deviations)."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from prunedm._atomic import write_text_atomic

from . import quality, quality_dit
from .common import environment
from .quality_seeds_report import (  # noqa: F401 (the report's names, re-exported for callers of this module)
    BEGIN,
    DEFAULT_BUDGETS,
    DEFAULT_LR,
    DEFAULT_SAMPLES,
    DEFAULT_SEEDS,
    DEFAULT_VARIANTS,
    END,
    METRICS,
    coverage,
    markdown,
    plot,
    readme_section,
    table,
    targets,
    update_readme,
    write_all,
)  # fmt: skip

# The Budget fields a variant's build reads (pruning, mask learning); the finetune and sampling fields are not.
BUILD_FIELDS = ("seed", "ratio", "mask_steps", "maskllm_lr", "gradient_images", "gradient_timesteps")
# Variants beyond bench.quality's: the learners' "short" presets (prunedm's, for tens to hundreds of steps) and
# MaskLLM's "official" preset as a whole (bench.quality's 2to4-maskllm runs it at 10x its lr; 2to4-maskpro is
# MaskPro's official preset).
EXTRA_DESCRIPTIONS = {
    "2to4-maskllm-official": "2:4 learned by MaskLLM, its 'official' preset (soft masks, lr 5e-4), then finetuned",
    "channels-magnitude-kd": "channel pruning, magnitude importance, finetuned with output KD from the dense model",
    "2to4-magnitude-kd": "2:4 by magnitude, finetuned with output KD from the dense model",
    "2to4-maskllm-short": "2:4 learned by MaskLLM, its 'short' preset, then finetuned",
    "2to4-maskpro-short": "2:4 learned by MaskPro, its 'short' preset (K=4, leave-one-out), then finetuned",
}


def baseline_of(variant: str) -> str | None:
    """The variant a row is compared against: magnitude 2:4, magnitude channels or every-k depth (also for
    dit-ecodiff: the same attention + FFN budget on the DiT, removed by depth instead of by heads/units)."""
    if variant.startswith("2to4-"):
        base = "2to4-magnitude"
    elif variant.startswith(("channels-", "scratch-")) and "+" not in variant:
        base = "channels-magnitude"
    elif variant.startswith("depth-") or variant == "dit-ecodiff":
        base = "depth-every-k"
    else:
        return None
    return None if base == variant else base


def _learn_preset(model, name: str, images: torch.Tensor, budget) -> None:
    """MaskLLM / MaskPro with the preset `name` ends in (the rest as bench.quality's learn_masks)."""
    from prunedm import masks as pm
    from prunedm.train.mask_loop import learn_mask_steps

    torch.manual_seed(budget.seed)
    _, method, preset = name.split("-")
    cls = {"maskllm": pm.MaskLLMLearner, "maskpro": pm.MaskProLearner}[method]
    learner = cls(model, quality.denoising_loss, preset=preset, total_steps=budget.mask_steps, seed=budget.seed)
    learn_mask_steps(learner, images, budget.mask_steps, budget.batch_size, budget.seed, progress=False,
                     desc=f"learn-mask {method} {preset}")  # fmt: skip
    learner.finalize()


def built_dir(work: Path, variant: str, budget) -> Path:
    """Where a variant's model as built (pruned / masked, before any finetune) is kept: keyed by the seed and
    every budget field the build reads, so each finetune budget of a (variant, seed) starts from one build."""
    key = {k: getattr(budget, k) for k in BUILD_FIELDS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return work / "built" / f"seed-{budget.seed}" / f"{variant}-{digest}"


def _build_once(build, name: str, budget, work: Path | None):
    """build() the first time; later budgets of the same (variant, seed) load that model (bit-exact)."""
    if work is None:
        return build()
    from prunedm import load_pretrained, save_pretrained

    path = built_dir(work, name, budget)
    if (path / "structure.json").is_file():
        return load_pretrained(path)
    model = build()
    save_pretrained(model, path)
    return model


@contextmanager
def _dit_built_once(work: Path):
    """bench.quality_dit's run, building each (DiT variant, seed) once for every budget (built_dir)."""
    original = quality_dit.build_variant

    def build(name, data, budget):
        return _build_once(lambda: original(name, data, budget), name, budget, work)

    quality_dit.build_variant = build
    try:
        yield
    finally:
        quality_dit.build_variant = original


def continue_from_shorter(work: Path, variant: str, seed: int, steps: int) -> int | None:
    """Seed work/steps-B/seed-S/<variant>/finetune with the finetune of the longest shorter budget L (0 < L < B,
    any earlier invocation's) whose checkpoint at step L exists, so the B-step run resumes at L instead of
    starting over; the finetune has a constant learning rate and a step-keyed RNG, so this equals a B-step run
    from scratch. Returns L or None."""
    target = work / f"steps-{steps}" / f"seed-{seed}" / variant / "finetune"
    if (target / "checkpoints").is_dir():
        return None
    found = {int(p.name.removeprefix("steps-")) for p in work.glob("steps-*") if p.name[6:].isdigit()}
    for shorter in sorted((b for b in found if 0 < b < steps), reverse=True):
        source = work / f"steps-{shorter}" / f"seed-{seed}" / variant / "finetune"
        if (source / "checkpoints" / f"step-{shorter:08d}").is_dir():
            temp = target.with_name(target.name + ".copying")
            shutil.rmtree(temp, ignore_errors=True)
            shutil.copytree(source, temp)
            temp.rename(target)
            return shorter
    return None


@contextmanager
def _extra_variants(work: Path | None = None):
    """bench.quality's run_variant, taught this module's extra variants for the duration; with `work`, each
    (variant, seed) is built once and reused by every finetune budget (built_dir)."""
    original = quality.build_variant

    def build_any(name, images, budget, progress):
        if name.endswith(quality.KD_SUFFIX):  # built as the variant without KD (the finetune adds the KD)
            return original(name.removesuffix(quality.KD_SUFFIX), images, budget, progress)
        if name in EXTRA_DESCRIPTIONS:
            model = quality.load_dense()
            _learn_preset(model, name, images, budget)
            return model
        return original(name, images, budget, progress)

    def build(name, images, budget, progress):
        built = name.removesuffix(quality.KD_SUFFIX)  # one build with and without KD
        return _build_once(lambda: build_any(name, images, budget, progress), built, budget, work)

    quality.build_variant = build
    added = {k: v for k, v in EXTRA_DESCRIPTIONS.items() if k not in quality.DESCRIPTIONS}
    quality.DESCRIPTIONS.update(added)
    try:
        yield
    finally:
        quality.build_variant = original
        for key in added:
            quality.DESCRIPTIONS.pop(key, None)


def lr_part(lr: float) -> str:
    """The directory level a non-default finetune lr adds (runs and finetune work of each lr apart)."""
    return "" if lr == DEFAULT_LR else f"lr-{lr:g}"


def run_path(out: Path, variant: str, seed: int, steps: int, lr: float = DEFAULT_LR) -> Path:
    return out / "runs" / lr_part(lr) / f"steps-{steps}" / f"seed-{seed}" / "variants" / f"{variant}.json"


def finetune_lr(row: dict) -> float | None:
    """A run's finetune lr (None for 0 finetune steps, where no lr applies)."""
    return None if int(row["finetune_steps"]) == 0 else float(row.get("budget", {}).get("lr", DEFAULT_LR))


def run_all(variants, seeds, budgets, base: quality.Budget, out: Path, work: Path, runner=None) -> list[dict]:
    """Every (variant, seed, budget) row, run or read back (resume); runner(name, budget, out, work) -> row."""
    rows = []
    images = reference = None
    lr_work = work / lr_part(base.lr)  # finetunes of each lr apart; builds (work/built) shared
    for steps in sorted(budgets):  # ascending: a longer budget continues the shorter one's finetune
        for seed in seeds:
            budget = replace(base, steps=steps, seed=seed)
            run_out = run_path(out, "x", seed, steps, base.lr).parents[1]
            run_work = lr_work / f"steps-{steps}" / f"seed-{seed}"
            for variant in variants:
                path = run_path(out, variant, seed, steps, base.lr)
                if path.exists():
                    rows.append(json.loads(path.read_text()))
                    continue
                if runner is None and variant in quality_dit.DIT_VARIANTS:
                    if not (quality_dit.DIT_DIR / "config.json").is_file():
                        print(f"skipped {variant}: no {quality_dit.DIT_DIR} (scripts/train_digits_models.py --dit)")
                        continue
                    continue_from_shorter(lr_work, variant, seed, steps)
                    with _dit_built_once(work):
                        row = quality_dit.run(variant, budget, run_out, run_work)
                elif runner is None:
                    if images is None:
                        from prunedm.data import DigitsDataset

                        size = quality.load_dense().config.sample_size
                        images = DigitsDataset("train", size=size).images
                        reference = quality.reference_images(base, size)
                    torch.manual_seed(seed)
                    resumed = continue_from_shorter(lr_work, variant, seed, steps)
                    if resumed:
                        print(f"{variant} seed {seed} steps {steps}: continues the {resumed}-step finetune")
                    with _extra_variants(work):
                        row = quality.run_variant(variant, images, reference, budget, run_work, run_out, False)
                    if variant in EXTRA_DESCRIPTIONS and ("maskllm" in variant or "maskpro" in variant):
                        row["mask_steps"] = budget.mask_steps
                        write_text_atomic(path, json.dumps(row, indent=1) + "\n")
                else:
                    row = runner(variant, budget, run_out, run_work)
                    write_text_atomic(path, json.dumps(row, indent=1) + "\n")
                print(f"{variant} seed {seed} steps {steps}: FID {row['fid']:.2f}", flush=True)
                rows.append(row)
    return rows


def runs_on_disk(out: Path) -> list[dict]:
    """Every finished (variant, seed, budget) row under out/runs."""
    paths = [*out.glob("runs/steps-*/seed-*/variants/*.json"), *out.glob("runs/lr-*/steps-*/seed-*/variants/*.json")]
    return [json.loads(p.read_text()) for p in sorted(paths)]


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (variant, finetune steps, finetune lr): n, seeds, mean/std/min/max of FID and accuracy, and the
    comparison with the baseline at the same steps (difference of means, and whether it exceeds the spread)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:  # runs of one protocol only: samples, DDIM steps and mask steps must agree
        key = (row["variant"], int(row["finetune_steps"]), row.get("num_samples"), row.get("sample_steps"),
               row.get("mask_steps", 0), finetune_lr(row))  # fmt: skip
        groups.setdefault(key, []).append(row)
    out = []
    for (variant, steps, samples, sample_steps, mask_steps, lr), members in groups.items():
        seeds = sorted(int(m["budget"]["seed"]) for m in members)
        agg = {"variant": variant, "finetune_steps": steps, "finetune_lr": lr, "n": len(members), "seeds": seeds,
               "num_samples": samples, "sample_steps": sample_steps, "mask_steps": mask_steps}  # fmt: skip
        for metric in METRICS:
            for key, value in _stats([float(m[metric]) for m in members]).items():
                agg[f"{metric}_{key}"] = value
        out.append(agg)
    index = {(r["variant"], r["finetune_steps"], r["finetune_lr"], r["num_samples"], r["sample_steps"]): r for r in out}
    for row in out:
        key = (row["finetune_steps"], row["finetune_lr"], row["num_samples"], row["sample_steps"])
        base = index.get((baseline_of(row["variant"]), *key))
        row["baseline"] = base["variant"] if base else None
        row["fid_diff"] = row["fid_mean"] - base["fid_mean"] if base else None
        row["beyond_spread"] = beyond_spread(row, base) if base else None
    order = {name: i for i, name in enumerate(list(DEFAULT_VARIANTS))}
    out.sort(key=lambda r: (r["finetune_steps"], -(r["finetune_lr"] or 0), order.get(r["variant"], len(order)),
                            r["variant"]))  # fmt: skip
    return out


def beyond_spread(row: dict, base: dict, metric: str = "fid") -> bool | None:
    """|mean difference| > std + std of the baseline; None when either side has fewer than 2 seeds."""
    if row["n"] < 2 or base["n"] < 2:
        return None
    diff = abs(row[f"{metric}_mean"] - base[f"{metric}_mean"])
    return diff > row[f"{metric}_std"] + base[f"{metric}_std"]


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} expects at least one integer, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/quality-seeds")
    parser.add_argument("--work", default="runs/quality-seeds", help="models and finetune checkpoints")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    parser.add_argument(
        "--budgets",
        default=",".join(map(str, DEFAULT_BUDGETS)),
        help="finetune steps; 0 scores the variant as built (learned masks on frozen weights)",
    )
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="samples per run for FID")
    parser.add_argument("--mask-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="finetune learning rate (constant)")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per sample")
    parser.add_argument("--readme", default=None, help="README whose quality-seeds block is regenerated")
    parser.add_argument("--aggregate-only", action="store_true", help="only re-aggregate the runs on disk")
    args = parser.parse_args(argv)
    try:
        seeds, budgets = _ints(args.seeds, "--seeds"), _ints(args.budgets, "--budgets")
    except ValueError as exc:
        parser.error(str(exc))
    if min(budgets) < 0:
        parser.error(f"--budgets: finetune steps must be >= 0 (0: the variant as built), got {args.budgets!r}")
    known = set(quality.variant_names()) | set(EXTRA_DESCRIPTIONS) | set(quality_dit.DIT_VARIANTS)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - known:
        parser.error(f"--variants: unknown {sorted(set(variants) - known)}; known: {sorted(known)}")
    if args.samples < 2:
        parser.error(f"--samples must be >= 2 (FID needs a covariance), got {args.samples}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    base = replace(quality.Budget(), samples=args.samples, mask_steps=args.mask_steps, sample_steps=args.sample_steps,
                   lr=args.lr)  # fmt: skip
    out = Path(args.out)
    if not args.aggregate_only:
        run_all(variants, seeds, budgets, base, out, Path(args.work))
    agg = aggregate(runs_on_disk(out))  # every run so far, this invocation's and earlier ones
    meta = {**environment(torch.device("cpu")), "budget": asdict(base)}
    write_all(agg, meta, out, Path(args.readme) if args.readme else None)
    print("\n".join(table(agg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
