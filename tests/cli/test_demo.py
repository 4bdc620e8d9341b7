"""`prunedm demo --quick` end to end in a subprocess: every stage, report.md with real numbers, the
refusal to reuse --out without --resume, and --resume rerunning only an unfinished stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STAGES = ["prune", "learn-mask", "finetune", "sparsify", "sample-dense", "sample", "eval-dense", "eval", "bench"]


def _demo(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "prunedm", "demo", "--quick", "--device", "cpu", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_quick_demo_writes_report_and_resumes(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    run = _demo("--out", str(out))
    assert run.returncode == 0, run.stderr
    assert f"report: {out / 'report.md'}" in run.stdout
    for stage in STAGES:
        assert (out / stage / "stage.json").is_file(), stage
        assert f"] {stage}: " in run.stdout

    summary = json.loads((out / "summary.json").read_text())["stages"]
    bench = summary["bench"]["result"]
    assert bench["device_type"] == "cpu" and bench["dense"]["latency_ms"] > 0 and bench["pruned"]["latency_ms"] > 0
    assert bench["pruned"]["params"] < 0.8 * bench["dense"]["params"]  # channels at ratio 0.3
    assert bench["pruned"]["nonzero_weights"] < 0.6 * bench["pruned"]["params"]  # most weights are in 2:4 layers
    assert (
        bench["pruned"]["macs_per_sample_2to4"] < bench["pruned"]["macs_per_sample"] < bench["dense"]["macs_per_sample"]
    )
    assert bench["pruned"]["bytes"] < 0.6 * bench["dense"]["bytes"]
    assert len(summary["sparsify"]["result"]["converted"]) >= 20
    for stage in ("eval-dense", "eval"):
        metrics = summary[stage]["result"]
        assert metrics["num_samples"] == 16 and metrics["fid"] > 0 and 0 <= metrics["classifier_accuracy"] <= 1

    report = (out / "report.md").read_text()
    assert "| parameters | 701.35k |" in report  # the shipped model's size, read from the model
    assert "CPU (cpu" in report and "FID (digits-classifier features" in report
    for image in ("samples-dense-vs-pruned.png", "summary.png"):
        with Image.open(out / image) as png:
            assert png.format == "PNG" and png.size[0] > 200

    again = _demo("--out", str(out))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"prunedm demo: error: --out {out} already holds a run: pass --resume to continue it, or choose another --out"
    ]

    # An interrupted run: the eval stage never finished. --resume redoes only that stage.
    (out / "eval" / "stage.json").unlink()
    (out / "report.md").unlink()
    resumed = _demo("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    skipped = [stage for stage in STAGES if f"] {stage}: finished in an earlier run" in resumed.stdout]
    assert skipped == [stage for stage in STAGES if stage != "eval"]
    assert (out / "report.md").is_file() and (out / "eval" / "stage.json").is_file()
