"""bench/run.py (`prunedm bench`): suites run on CPU and write JSON, CSV and PNGs with the environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
from prunedm.bench import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_quick_layers_and_models_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--quick", "--device", "cpu", "--suite", "layers,models", "--layer-models", "dit",
            "--models", "tiny-unet", "--out", str(out)]  # fmt: skip
    assert run.main(argv) == 0
    summary = json.loads((out / "bench.json").read_text())
    assert summary["suites"] == ["layers", "models"] and summary["environment"]["device"].startswith("cpu")
    assert summary["environment"]["commit"] and summary["environment"]["torch"]
    for name in ("layers.json", "layers.csv", "layers_speedup.png", "layers_latency_by_batch.png",
                 "models.json", "models.csv", "models_latency.png", "models_memory.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
        assert name in summary["files"]
    layers = json.loads((out / "layers.json").read_text())["rows"]
    assert {r["batch"] for r in layers} == {1, 4} and all(r["device"] == "cpu" and r["ok"] for r in layers)
    model_rows = json.loads((out / "models.json").read_text())["rows"]
    assert {r["variant"] for r in model_rows} == {"dense", "pruned", "2:4", "pruned+2:4"}
    assert (out / "models.csv").read_text().count("\n") == len(model_rows) + 1


def test_bad_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit):
        run.main(["--suite", "nope", "--out", str(tmp_path)])


def test_module_entry_point_from_the_repo_root():
    out = subprocess.run([sys.executable, "-m", "bench.run", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--suite" in out.stdout
