"""The quality benchmark's quick path: every variant runs, every output file is written, numbers are sane."""

from __future__ import annotations

import csv
import json
import math

import pytest

# ~2 CPU-minutes (ten variants, each pruned/masked, finetuned, sampled and scored): marked slow.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def test_quick_quality_table_writes_every_file(tmp_path, capsys):
    from prunedm.bench.quality import main, variant_names

    out = tmp_path / "quality"
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    names = variant_names()
    data = json.loads((out / "quality.json").read_text())
    rows = {row["variant"]: row for row in data["rows"]}
    assert list(rows) == names
    env = data["environment"]
    assert env["torch"] and env["commit"] and env["device"].startswith("cpu") and env["diffusers"]
    for name, row in rows.items():
        for key in ("fid", "classifier_accuracy", "class_entropy", "latency_ms", "latency_ratio"):
            assert math.isfinite(row[key]), (name, key)
        assert row["fid"] >= 0 and 0 <= row["classifier_accuracy"] <= 1 and 0 <= row["class_entropy"] <= math.log(10)
        assert row["finetune_steps"] == 1 and row["num_samples"] == 40
        assert (out / "samples" / f"{name}.png").stat().st_size > 100
        assert (out / "variants" / f"{name}.json").exists()
    assert rows["dense"]["latency_ratio"] == 1.0
    for pruned in ("channels-random", "channels-diff-pruning", "scratch-diff-pruning"):
        assert rows["dense"]["params"] > rows[pruned]["params"]
        assert rows["dense"]["macs"] > rows[pruned]["macs"]
    for sparse in ("2to4-magnitude", "2to4-maskllm", "2to4-maskpro"):
        assert rows[sparse]["params"] == rows["dense"]["params"]
        assert rows[sparse]["nonzero_params"] < 0.6 * rows["dense"]["nonzero_params"]
        assert rows[sparse]["effective_macs"] < 0.6 * rows["dense"]["macs"]
    assert rows["2to4-maskllm"]["mask_steps"] == 1 and rows["2to4-magnitude"]["mask_steps"] == 0
    with open(out / "quality.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == names
    table = (out / "quality.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert (out / "quality.png").stat().st_size > 1000

    # Resumable: a second run skips every finished variant (no finetune) and rewrites the table.
    capsys.readouterr()
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    assert "FID" not in capsys.readouterr().out.split("| variant |")[0]
    again = json.loads((out / "quality.json").read_text())
    assert [r["fid"] for r in again["rows"]] == [rows[n]["fid"] for n in names]
