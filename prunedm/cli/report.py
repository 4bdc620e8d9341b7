"""The demo's report: report.md with the numbers (quality, size, speed, stage timings), the dense and
pruned sample grids side by side, and a plot of the training curves and the ratios to dense."""

from __future__ import annotations

import json
from pathlib import Path

from prunedm._atomic import atomic_file, write_text_atomic

REPORT = "report.md"
SAMPLES_FIGURE = "samples-dense-vs-pruned.png"
PLOT = "summary.png"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save_figure(figure, path: Path) -> None:
    with atomic_file(path, suffix=".png") as tmp:  # matplotlib picks the format from the suffix
        figure.savefig(tmp, dpi=110, bbox_inches="tight")


def samples_figure(out: Path, path: Path) -> None:
    """Dense and pruned sample grids (the sample stages' samples.png) side by side, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figure, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for axis, (stage, title) in zip(axes, [("sample-dense", "dense"), ("sample", "pruned + 2:4")]):
        axis.imshow(Image.open(out / stage / "samples.png"), cmap="gray", interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    _save_figure(figure, path)
    plt.close(figure)


def summary_plot(out: Path, records: dict, path: Path) -> None:
    """Three panels: learn-mask loss, finetune loss, and pruned/dense ratios (params, MACs, bytes, latency, FID)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, stage, title in [(axes[0], "learn-mask", "learn-mask (2:4 masks)"), (axes[1], "finetune", "finetune")]:
        rows = [r for r in _read_jsonl(out / stage / "metrics.jsonl") if "loss" in r]
        axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 30 else None)
        axis.set_title(f"{title}: loss")
        axis.set_xlabel("step")
    bench = records["bench"]["result"]
    dense, pruned = bench["dense"], bench["pruned"]
    dense_fid, pruned_fid = records["eval-dense"]["result"]["fid"], records["eval"]["result"]["fid"]
    labels = ["params", "MACs", "MACs\n(2:4 HW)", "bytes", "latency", "FID"]
    values = [
        pruned["params"] / dense["params"],
        pruned["macs_per_sample"] / dense["macs_per_sample"],
        pruned["macs_per_sample_2to4"] / dense["macs_per_sample"],
        pruned["bytes"] / dense["bytes"],
        pruned["latency_ms"] / dense["latency_ms"],
        pruned_fid / dense_fid if dense_fid > 0 else float("nan"),
    ]
    axes[2].bar(labels, values, color=["C0", "C0", "C0", "C0", "C1", "C2"])
    axes[2].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axes[2].set_title(f"pruned / dense (latency: {bench['device']})", fontsize=9)
    for i, value in enumerate(values):
        axes[2].text(i, value, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _row(name: str, dense: float, pruned: float, fmt=_count) -> str:
    ratio = pruned / dense if dense else float("nan")
    return f"| {name} | {fmt(dense)} | {fmt(pruned)} | {ratio:.3f} |"


def render_markdown(config: dict, records: dict) -> str:
    """report.md's text from the demo's config and its stages' records (stage.json contents)."""
    bench = records["bench"]["result"]
    dense, pruned = bench["dense"], bench["pruned"]
    ev_dense, ev = records["eval-dense"]["result"], records["eval"]["result"]
    sparsify = records["sparsify"]["result"]
    prune = records["prune"]["result"]
    lm, ft, sample = config["learn_mask"], config["finetune"], config["sample"]
    cpu = bench["device_type"] == "cpu"
    where = f"CPU ({bench['device']})" if cpu else bench["device"]

    def fixed(n):
        return f"{n:.2f}"

    def fixed3(n):
        return f"{n:.3f}"

    def ms(n):
        return f"{n:.2f} ms"

    lines = [
        "# prunedm demo report",
        "",
        f"The shipped digits DDPM (`{config['model']}`, 16x16) pruned by channels "
        f"({config['prune']['importance']} importance, ratio {config['prune']['ratio']}), given learned 2:4 masks "
        f"({lm['method']}, {lm['steps']} steps), finetuned {ft['steps']} steps keeping the 2:4 pattern, and "
        f"packed to 2:4 ({len(sparsify['converted'])} layers converted, {len(sparsify['skipped'])} kept dense). "
        f"Quality: {ev['num_samples']} samples each ({sample['scheduler'].upper()}, {sample['steps']} steps), "
        f"FID with {ev['features']} features against the digits.",
        "",
        "| | dense | pruned + 2:4 | pruned / dense |",
        "|---|---|---|---|",
        _row(f"FID ({ev['features']} features; lower is better)", ev_dense["fid"], ev["fid"], fixed),
        _row("classifier accuracy (share of confident digits)", ev_dense["classifier_accuracy"],
             ev["classifier_accuracy"], fixed3),
        _row("class entropy (nats; ln 10 = 2.30)", ev_dense["class_entropy"], ev["class_entropy"], fixed),
        _row("parameters", dense["params"], pruned["params"]),
        _row("non-zero weights", dense["nonzero_weights"], pruned["nonzero_weights"]),
        _row("MACs per sample (dense math)", dense["macs_per_sample"], pruned["macs_per_sample"]),
        _row("MACs per sample (2:4 layers at half, as sparse tensor cores run them)", dense["macs_per_sample"],
             pruned["macs_per_sample_2to4"]),
        _row("model bytes (parameters + buffers, 2:4 packed)", dense["bytes"], pruned["bytes"]),
        _row(f"forward latency, batch {bench['batch_size']}, {bench['dtype']}, {where}", dense["latency_ms"],
             pruned["latency_ms"], ms),
        "",
        f"Speedup vs dense: **{bench['speedup_vs_dense']:.2f}x** on {where} (median of {bench['rounds']} "
        "interleaved rounds)."
        + (
            " On a CPU the 2:4 layers run dense math on unpacked weights: this speedup comes from the channel "
            "pruning alone; sparse tensor cores (GPU, sm80+) are what turn 2:4 into time."
            if cpu
            else ""
        ),
        f"Channel pruning alone: {_count(prune['params_before'])} -> {_count(prune['params_after'])} parameters, "
        f"{_count(prune['macs_before'])} -> {_count(prune['macs_after'])} MACs.",
        "",
        f"![dense vs pruned samples]({SAMPLES_FIGURE})",
        "",
        f"![training curves and ratios to dense]({PLOT})",
        "",
        "## Stages",
        "",
        "| stage | seconds | output |",
        "|---|---|---|",
    ]  # fmt: skip
    for name, record in records.items():
        lines.append(f"| {name} | {record['seconds']:.1f} | `{name}/` |")
    lines += [
        "",
        f"Total: {sum(r['seconds'] for r in records.values()):.0f} s of stage time. Each stage directory holds "
        "the job's resolved `config.yaml`, its outputs and `log.txt`; `prunedm demo --resume` reruns only "
        "what is unfinished.",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, config: dict, records: dict) -> Path:
    """Write out/report.md, out/samples-dense-vs-pruned.png and out/summary.png; returns report.md's path."""
    out = Path(out)
    samples_figure(out, out / SAMPLES_FIGURE)
    summary_plot(out, records, out / PLOT)
    path = out / REPORT
    write_text_atomic(path, render_markdown(config, records))
    write_text_atomic(out / "summary.json", json.dumps({"config": config, "stages": records}, indent=1) + "\n")
    return path
