"""bench.quality_seeds' protocol constants and its report: the table, the coverage and targets lines, the
markdown page, the plot and the README block (bench.quality_seeds runs and aggregates; this renders)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from prunedm._atomic import write_text_atomic

from . import quality, quality_dit
from .common import save_figure, write_results

DEFAULT_VARIANTS = (
    "dense", "channels-magnitude", "channels-taylor", "channels-random", "channels-diff-pruning",
    "2to4-magnitude", "2to4-maskllm-official", "2to4-maskllm-short", "2to4-maskpro", "2to4-maskpro-short",
    *quality_dit.DIT_VARIANTS,
)  # fmt: skip
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_BUDGETS = (100, 400)
DEFAULT_SAMPLES = 1000
DEFAULT_LR = quality.Budget().lr  # the protocol's finetune lr; other lrs keep their runs under runs/lr-<lr>/
METRICS = ("fid", "classifier_accuracy")
BEGIN, END = "<!-- quality-seeds:begin -->", "<!-- quality-seeds:end -->"


def _fmt(value, spec="{:.2f}") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else spec.format(value)


def table(agg: list[dict]) -> list[str]:
    lines = [
        "| variant | finetune steps | finetune lr | mask steps | seeds | samples x DDIM steps | FID mean ± std "
        "| FID min-max | clf. acc. mean ± std | FID − baseline | beyond seed spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in agg:
        mark = {True: "**yes**", False: "no", None: "-"}[r["beyond_spread"]]
        diff = f"{_fmt(r['fid_diff'], '{:+.2f}')} vs {r['baseline']}" if r["baseline"] else "-"
        lines.append(
            f"| {r['variant']} | {r['finetune_steps']} | {_fmt(r.get('finetune_lr'), '{:g}')} | "
            f"{r.get('mask_steps') or '-'} | {r['n']} | "
            f"{r.get('num_samples')} x {r.get('sample_steps')} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} | "
            f"{r['fid_min']:.2f}-{r['fid_max']:.2f} | {r['classifier_accuracy_mean']:.3f} ± "
            f"{r['classifier_accuracy_std']:.3f} | {diff} | {mark} |"
        )
    return lines


def coverage(agg: list[dict]) -> str:
    """Which parts of the issue-15 protocol (every variant x >= 3 seeds x 100 and 400 steps) this run covers."""
    ran = {(r["variant"], r["finetune_steps"]): r["n"] for r in agg if r.get("finetune_lr") in (None, DEFAULT_LR)}
    missing = [f"{v} @ {b}" for b in DEFAULT_BUDGETS for v in DEFAULT_VARIANTS if ran.get((v, b), 0) < 3]
    samples = sorted({r["num_samples"] for r in agg if r["num_samples"]})
    short = " (the protocol asks for >= 1000)" if samples and min(samples) < DEFAULT_SAMPLES else ""
    lines = [f"Ran: {len(agg)} (variant, budget) cells; FID on {', '.join(map(str, samples))} samples per run{short}."]
    if missing:
        lines.append(f"Not run (or fewer than 3 seeds) of the full protocol: {', '.join(missing)}.")
    if not (quality_dit.DIT_DIR / "config.json").is_file():
        lines.append("The digits DiT is not shipped yet (`python scripts/train_digits_models.py --dit`).")
    return " ".join(lines)


def _learned_vs_magnitude(agg: list[dict], steps: int, lr: float | None = None) -> str | None:
    """'met'/'missed' with the best learned 2:4 row at `steps` finetune steps (at finetune lr `lr`), or None
    when not measured."""

    def learned_mask(variant: str) -> bool:  # MaskLLM / MaskPro masks with the plain finetune (not -kd)
        return variant.startswith(("2to4-maskllm", "2to4-maskpro")) and not variant.endswith(quality.KD_SUFFIX)

    learned = [r for r in agg if r["finetune_steps"] == steps and r.get("finetune_lr") == lr and r["baseline"]
               and learned_mask(r["variant"]) and r["beyond_spread"] is not None]  # 2+ seeds each  # fmt: skip
    if not learned:
        return None
    best = min(learned, key=lambda r: r["fid_diff"])
    met = any(r["beyond_spread"] and r["fid_diff"] < 0 for r in learned)
    return f"{'met' if met else 'missed'} (best {best['variant']}, FID {best['fid_diff']:+.2f} vs magnitude)"


def targets(agg: list[dict]) -> str:
    """Issue 15's targets, as measured here (or 'not measured'), for the protocol's finetune lr and for every
    other lr measured; plus the masks on frozen weights (budget 0)."""
    lrs = sorted({r["finetune_lr"] for r in agg if r.get("finetune_lr") not in (None, DEFAULT_LR)}, reverse=True)
    text = "Issue 15 targets: " + _targets_at(agg, DEFAULT_LR) + "."
    for lr in lrs:
        text += f" At finetune lr {lr:g} (the same protocol otherwise): " + _targets_at(agg, lr) + "."
    frozen = _learned_vs_magnitude(agg, 0)
    if frozen is not None:
        text += f" Masks on frozen weights (0 finetune steps, MaskLLM's and MaskPro's own protocol): {frozen}."
    return text


def _targets_at(agg: list[dict], lr: float) -> str:
    agg = [r for r in agg if r.get("finetune_lr", DEFAULT_LR) == lr]
    at = {(r["variant"], r["finetune_steps"]): r for r in agg}
    result = _learned_vs_magnitude(agg, 100, lr) or "not measured (2+ seeds each)"
    first = f"learned 2:4 beats magnitude 2:4 beyond the seed spread at 100 steps: {result}"
    dense = at.get(("dense", 400))
    if dense is None:
        second = "a channel-pruned and a 2:4 variant within 10% of dense FID at 400 steps: not measured"
    else:
        near = [r["variant"] for r in agg if r["finetune_steps"] == 400 and r["fid_mean"] <= 1.1 * dense["fid_mean"]
                and r["variant"].startswith(("channels-", "2to4-"))]  # fmt: skip
        ok = any(v.startswith("channels-") for v in near) and any(v.startswith("2to4-") for v in near)
        second = (f"a channel-pruned and a 2:4 variant within 10% of dense FID ({dense['fid_mean']:.2f}) at 400 "
                  f"steps: {'met' if ok else 'missed'} (within: {', '.join(near) or 'none'})")  # fmt: skip
    return f"{first}; {second}"


FULL_COMMAND = "python -m bench.quality_seeds --out bench/results/quality-seeds --readme README.md"


def markdown(agg: list[dict], meta: dict) -> str:
    budget = meta["budget"]
    return "\n".join([
        "# Quality over seeds (digits DDPM)", "", *table(agg), "",
        f"Per run: bench.quality's pipeline, batch {budget['batch_size']}, lr {budget['lr']}, EMA "
        f"{budget['ema_decay']} (with warm-up), the mask-learning steps, samples and DDIM steps in the table, "
        "FID against "
        f"{'all 1,797' if not budget['reference'] else budget['reference']} digits on the digits classifier's "
        "features. The seed sets the finetune, mask and sampling seeds. std: sample standard deviation over seeds.",
        "", "Beyond seed spread: |FID mean − baseline FID mean| > std + baseline std (2+ seeds each side).", "",
        coverage(agg), "", targets(agg), "", f"Environment: {meta.get('device')}, torch {meta.get('torch')}, commit "
        f"{meta.get('commit')}, {meta.get('date')}.", "", f"Full protocol: `{FULL_COMMAND}`.",
    ]) + "\n"  # fmt: skip


def budget_line(budget: dict) -> str:
    if not budget:
        return ""
    return (f"Per run: batch {budget.get('batch_size')}, lr {budget.get('lr')}, EMA {budget.get('ema_decay')} "
            "(warm-up); mask steps, samples and DDIM steps as in the table.")  # fmt: skip


def readme_section(agg: list[dict], meta: dict, results: str = "bench/results/quality-seeds") -> str:
    """The README's generated block (between BEGIN and END)."""
    return "\n".join([
        BEGIN, "", "#### Over seeds, with spread (generated by `bench.quality_seeds`)", "", *table(agg), "",
        budget_line(meta.get("budget", {})), coverage(agg), targets(agg),
        "Beyond seed spread: |FID mean − baseline FID mean| > std + baseline std. "
        f"Details: [{results}/quality-seeds.md]({results}/quality-seeds.md), plot "
        f"[quality-seeds.png]({results}/quality-seeds.png). Full protocol: `{FULL_COMMAND}`.", "", END,
    ])  # fmt: skip


def update_readme(path: Path, section: str) -> bool:
    """Replace the block between the markers in `path`; returns whether the file changed."""
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"readme: {path} has no {BEGIN} ... {END} block to regenerate")
    new = pattern.sub(lambda _: section, text, count=1)
    if new != text:
        write_text_atomic(path, new)
    return new != text


def plot(agg: list[dict], path: Path) -> Path | None:
    """FID mean with std error bars (and min-max as thin bars), one panel per finetune budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    budgets = sorted({(r["finetune_steps"], r.get("finetune_lr") or 0.0) for r in agg}, key=lambda b: (b[0], -b[1]))
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 0.4 * len(agg) + 2), squeeze=False)
    for ax, (steps, lr) in zip(axes[0], budgets):
        rows = [r for r in agg if r["finetune_steps"] == steps and (r.get("finetune_lr") or 0.0) == lr]
        y = range(len(rows))
        means = [r["fid_mean"] for r in rows]
        ranges = [[m - r["fid_min"] for m, r in zip(means, rows)], [r["fid_max"] - m for m, r in zip(means, rows)]]
        ax.errorbar(means, y, xerr=ranges, fmt="none", ecolor="lightgray", elinewidth=6)
        ax.errorbar(means, y, xerr=[r["fid_std"] for r in rows], fmt="o", capsize=4)
        ax.set_yticks(list(y), [f"{r['variant']} (n={r['n']})" for r in rows], fontsize=8)
        ax.invert_yaxis()
        at = f" at lr {lr:g}" if steps else ""
        ax.set_title(f"{steps} finetune steps{at}: FID mean ± std (gray: min-max)", fontsize=9)
    return save_figure(fig, path)


def write_all(agg: list[dict], meta: dict, out: Path, readme: Path | None) -> None:
    write_results(out, "quality-seeds", meta, agg)
    write_text_atomic(out / "quality-seeds.md", markdown(agg, meta))
    plot(agg, out / "quality-seeds.png")
    if readme is not None:
        update_readme(readme, readme_section(agg, meta))
