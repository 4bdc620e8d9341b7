"""The console script in fresh processes: bad input is one line on stderr with exit code 2 and no
traceback; finetune under `torchrun --nproc_per_node 2` on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _prunedm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunedm", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["prune", "--config", "/nonexistent/recipe.yaml"],
            "prunedm prune: error: --config /nonexistent/recipe.yaml: no such file",
        ),
        (["prune", "model=arch:tiny-unet", "method=depth"], "prunedm prune: error: method=depth needs a transformer"),
        (
            ["finetune", "model=arch:tiny-unet", "finetune.stpes=3"],
            "unknown config key 'finetune.stpes'; did you mean 'steps'?",
        ),
    ],
)
def test_bad_input_in_a_fresh_process(tmp_path, argv, message):
    out = tmp_path / "run"
    result = _prunedm(*argv, "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_finetune_under_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ft"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "prunedm", "finetune", "model=arch:tiny-unet", "device=cpu", "finetune.steps=2",
        "finetune.batch_size=4", "finetune.log_every=1", "finetune.progress=false", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finetuned (EMA) model saved") == 1  # rank 0 alone writes
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    assert (out / "model" / "structure.json").is_file() and (out / "checkpoints").is_dir()
    assert yaml.safe_load((out / "config.yaml").read_text())["finetune"]["batch_size"] == 4
