"""How a job's config is put together and where it runs: the precedence of --quick, --config,
key=value and flags; --resume clearing a killed run's temporaries; `prunedm bench --device auto`."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from prunedm.cli import main

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread_module")]


@pytest.fixture
def recorded(monkeypatch):
    """Replace every job's work by recording the config it was given."""
    import prunedm.cli

    configs = []
    monkeypatch.setattr(prunedm.cli, "_job_runner", lambda command: lambda config, out, resume: configs.append(config))
    return configs


def test_quick_precedence_defaults_quick_config_overrides_flags(tmp_path, recorded):
    path = tmp_path / "demo.yaml"
    path.write_text("seed: 3\nfinetune: {batch_size: 8}\nsample: {steps: 4}\n")
    argv = ["demo", "--quick", "--config", path, "finetune.steps=3", "sample.steps=2", "seed=4", "--seed", "5"]
    assert main([*map(str, argv), "--out", str(tmp_path / "out")]) == 0
    config = recorded[0]
    assert config["learn_mask"]["steps"] == 1  # --quick over the defaults (100)
    assert config["finetune"]["batch_size"] == 8  # the file over --quick (4)
    assert config["finetune"]["steps"] == 3  # key=value over --quick (1)
    assert config["sample"]["steps"] == 2  # key=value over the file (4)
    assert config["seed"] == 5  # --seed over key=value
    assert config["finetune"]["lr"] == 5e-4  # untouched: the default
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()) == config


def test_resume_removes_the_temporaries_a_killed_run_left(tmp_path, recorded):
    out = tmp_path / "out"
    argv = ["sample", "model=arch:tiny-unet", "--out", str(out)]
    assert main(argv) == 0
    (out / "samples.safetensors").write_text("whole")
    (out / ".samples.safetensors.prunedm-tmp-1234").write_text("half")
    (out / "stage").mkdir()
    (out / "stage" / ".model.prunedm-tmp-99").mkdir()
    assert main([*argv, "--resume"]) == 0
    assert sorted(p.name for p in out.rglob("*")) == ["config.yaml", "samples.safetensors", "stage"]
    assert len(recorded) == 2


def test_failed_new_run_keeps_demo_stage_progress(tmp_path, monkeypatch):
    import prunedm.cli

    def fails_after_a_stage(config, out, resume):
        (out / "prune").mkdir()
        (out / "prune" / "stage.json").write_text("{}")
        raise ValueError("stage two failed")

    monkeypatch.setattr(prunedm.cli, "_job_runner", lambda command: fails_after_a_stage)
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out)]) == 2
    assert (out / "prune" / "stage.json").is_file()  # --resume continues from here


def test_finetune_with_lr_written_1e_4_runs(tmp_path, capsys):
    path = tmp_path / "ft.yaml"
    path.write_text("finetune:\n  lr: 1e-4\n  steps: 1\n  batch_size: 4\n  progress: false\n")
    out = tmp_path / "out"
    assert main(["finetune", "model=arch:tiny-unet", "--config", str(path), "finetune.weight_decay=1E-2",
                 "--out", str(out)]) == 0  # fmt: skip
    resolved = yaml.safe_load((out / "config.yaml").read_text())["finetune"]
    assert resolved["lr"] == 1e-4 and resolved["weight_decay"] == 0.01
    assert json.loads((out / "report.json").read_text())["steps"] == 1


def test_bench_resolves_auto_before_the_suites(monkeypatch, tmp_path):
    import types

    calls = []
    fake = types.ModuleType("prunedm.bench.run")
    fake.main = lambda argv: calls.append(argv) or 0
    package = types.ModuleType("prunedm.bench")  # the installed bench/ need not be there for this
    package.run = fake
    monkeypatch.setitem(sys.modules, "prunedm.bench", package)
    monkeypatch.setitem(sys.modules, "prunedm.bench.run", fake)
    assert main(["bench", "--out", str(tmp_path), "--quick", "--suite", "ops"]) == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert calls == [["--out", str(tmp_path), "--device", expected, "--quick", "--suite", "ops"]]


def test_bench_run_device_resolution():
    from prunedm.bench.run import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device must be auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of --device auto")
def test_bench_device_auto_on_a_machine_without_cuda(tmp_path, capsys):
    pytest.importorskip("prunedm.bench", reason="bench/ is installed as prunedm.bench by pip install")
    out = tmp_path / "bench"
    assert main(["bench", "--device", "auto", "--quick", "--suite", "ops", "--out", str(out)]) == 0
    summary = json.loads((out / "bench.json").read_text())
    assert summary["suites"] == ["ops"] and summary["environment"]["device"].startswith("cpu")
    ops = json.loads((out / "ops.json").read_text())
    assert ops["environment"]["device"].startswith("cpu") and all(r["median_ms"] > 0 for r in ops["rows"])
    assert (out / "ops.png").stat().st_size > 0


def test_report_figures_are_written_whole(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from prunedm.cli.report import _save_figure

    figure = plt.figure(figsize=(2, 2))
    _save_figure(figure, tmp_path / "plot.png")
    plt.close(figure)
    with Image.open(tmp_path / "plot.png") as png:
        assert png.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_selftest_without_a_gpu_says_so_and_exits_0(monkeypatch, capsys):
    from prunedm.nn import _selftest

    monkeypatch.setattr(_selftest, "device_available", lambda: False)
    assert main(["selftest"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["device", "kernel", "implementation", "status", "source", "detail"]
    assert "skipped" in lines[1] and lines[1].endswith("no CUDA device is visible")


def test_selftest_passes_force_and_returns_the_exit_code(monkeypatch, capsys):
    from prunedm.nn import _selftest

    calls = []
    monkeypatch.setattr(_selftest, "main", lambda argv: calls.append(argv) or len(calls) - 1)
    assert main(["selftest"]) == 0 and main(["selftest", "--force"]) == 1  # a quarantined kernel: exit 1
    assert calls == [[], ["--force"]]
    assert main(["selftest", "--all"]) == 2
    assert "unrecognized arguments: --all" in capsys.readouterr().err
