"""scripts/gpu-check.sh without a GPU: the --dry-run runs every step's logic on the CPU, the budget plan and skips,
the result files (at most 8 under --out) and one-line errors for bad arguments; its helpers as units."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
sys.path.insert(0, str(ROOT / "scripts" / "gpu_check"))

import _common  # noqa: E402
import source_hash  # noqa: E402
import summary  # noqa: E402

STEPS = ["env", "setup", "correctness", "pytest", "sanitizer", "timing", "e2e"]
RESULT_FILES = {"gpu-check.log", "summary.json", "details.tar.gz", "env.json", "correctness.json",
                "pytest-cuda.xml", "timing.json", "e2e.json"}  # fmt: skip


def run_check(*args, env_extra: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    env.pop("PRUNEDM_GPU_CHECK_INNER", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def plan_budgets(stdout: str) -> dict[str, int]:
    lines = stdout.split("plan (step, budget s):\n", 1)[1].splitlines()
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s+(\w+)\s+(\d+)(.*)", line)
        if not match:
            break
        found[match.group(1)] = int(match.group(2))
    return found


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One full dry run (shared by the tests below: it is the slow part). GPU_CHECK_TIME_SCALE gives a CPU
    shared with other jobs room; on an idle machine the run takes about a minute."""
    out = tmp_path_factory.mktemp("gpu") / "out"
    start = time.monotonic()
    result = run_check("--dry-run", "--out", out, env_extra={"GPU_CHECK_TIME_SCALE": "3"}, timeout=450 * 3 + 60)
    return result, out, time.monotonic() - start


def test_dry_run_plan_sums_to_at_most_450_s(dry_run):
    result, _, _ = dry_run
    budgets = plan_budgets(result.stdout)
    assert list(budgets) == [*STEPS, "total"], result.stdout
    assert sum(budgets[s] for s in STEPS) == budgets["total"]
    assert budgets["total"] + 5 <= 450  # the steps plus the summary's reserve


def test_dry_run_every_step_runs_and_passes(dry_run):
    result, out, seconds = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    data = json.loads((out / "summary.json").read_text())
    assert data["dry_run"] is True
    assert [s["step"] for s in data["steps"]] == STEPS
    assert {s["step"]: s["status"] for s in data["steps"]} == dict.fromkeys(STEPS, "ok")
    for step in STEPS:
        assert f"== {step} (" in result.stdout and f"== {step}: ok in " in result.stdout


def test_dry_run_writes_at_most_eight_result_files(dry_run):
    _, out, _ = dry_run
    assert {p.name for p in out.iterdir()} == RESULT_FILES
    with tarfile.open(out / "details.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./steps.tsv", "./setup/setup.json", "./sanitizer/calls.txt", "./timing/layers.json"} <= names
    assert not any("prunedm-tmp" in name for name in names)


def test_dry_run_results_hold_real_values(dry_run):
    _, out, _ = dry_run
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["device"]["name"] == "cpu (dry run)"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", env["commit"]["commit"])

    correctness = json.loads((out / "correctness.json").read_text())
    assert not correctness["counts"].get("FAIL") and not correctness["counts"].get("ERROR"), correctness["counts"]
    ops_passed = {c["op"] for c in correctness["cases"] if c["status"] == "pass"}
    assert {"nm_mask", "nm_violations", "compress_2to4", "decompress_2to4", "gumbel_nm_sample",
            "gumbel_pattern_sample", "sparse_linear_2to4", "sparse_conv2d_2to4"} <= ops_passed  # fmt: skip
    linear = [c for c in correctness["cases"] if c["op"] == "sparse_linear_2to4" and c["status"] == "pass"]
    # Every epilogue on the odd shapes, each within float32's tolerance of the float64 reference.
    epilogues = set(itertools.product(("none", "relu", "silu", "gelu", "gelu_tanh"), (False, True), (False, True)))
    assert {(c["activation"], c["bias"], c["residual"]) for c in linear} == epilogues
    assert max(c["max_rel_err"] for c in linear) <= 1e-5
    conv = {c["format"] for c in correctness["cases"] if c["op"] == "sparse_conv2d_2to4" and c["status"] == "pass"}
    assert conv == {"nchw", "nhwc"}

    timing = json.loads((out / "timing.json").read_text())
    dense = [r for r in timing["kernels"] if r["backend"] == "dense"]
    assert dense and all(r["median_ms"] > 0 and r["ok"] for r in dense)
    assert any(r["backend"] == "torch cuSPARSELt" and "CUDA only" in r["error"] for r in timing["kernels"])
    # The CPU twin of the kernels, checked against dense and timed against it in the same run.
    assert {"linear prunedm[extension]", "conv2d prunedm[extension] nchw"} <= set(timing["headline"])
    assert timing["layers"] and timing["ops"]

    e2e = json.loads((out / "e2e.json").read_text())
    sparse = [r for r in e2e["rows"] if r["backend"] in ("torch", "prunedm", "auto")]
    assert {r["model"] for r in sparse} == {"dit-s-2", "tiny-unet"} and len(sparse) == 6
    for r in sparse:
        assert r["ok"] and r["max_rel_err"] <= 1e-4 and r["converted"] > 0, r
        assert sum(r["paths"].values()) == r["converted"]  # which path each converted layer ran


def test_small_budget_skips_steps_with_a_log_line(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    result = run_check("--dry-run", "--budget", "20", "--out", out, timeout=120)
    assert time.monotonic() - start < 20 + 15  # the hard self-timeout
    data = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in data["steps"]}
    for step in ("correctness", "pytest", "sanitizer", "timing", "e2e"):
        assert status[step] == "skipped", status
        assert re.search(rf"== {step}: skipped, needs \d+ s and -?\d+ s are left", result.stdout), result.stdout
    assert len(list(out.iterdir())) <= 8


def test_only_runs_the_named_steps(tmp_path):
    out = tmp_path / "out"
    result = run_check("--dry-run", "--only", "env", "--out", out, timeout=120)
    data = json.loads((out / "summary.json").read_text())
    status = {s["step"]: (s["status"], s["note"]) for s in data["steps"]}
    assert status["env"][0] in ("ok", "timeout"), result.stdout
    assert all(status[s] == ("skipped", "not in --only") for s in STEPS[1:])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--budget", "abc"], ["--budget", "whole number"]),
        (["--budget", "5"], ["--budget", "[10, 3600]"]),
        (["--budget"], ["--budget", "seconds"]),
        (["--only", "env,warp"], ["--only", "warp"]),
        (["--frobnicate"], ["unknown argument", "--frobnicate"]),
        (["--out", ""], ["--out", "directory"]),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, words):
    out = tmp_path / "out"
    result = run_check(*args, *(["--out", out] if "--out" not in args else []), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "results"
    out.write_text("keep")
    result = run_check("--dry-run", "--out", out, timeout=60)
    assert result.returncode == 2 and "not a directory" in result.stderr and out.read_text() == "keep"


def test_bad_time_scale_is_refused(tmp_path):
    result = run_check("--dry-run", "--out", tmp_path / "o", env_extra={"GPU_CHECK_TIME_SCALE": "0.5"}, timeout=60)
    assert result.returncode == 2 and "GPU_CHECK_TIME_SCALE" in result.stderr and not (tmp_path / "o").exists()


def test_plan_in_the_script_fits_450_s():
    text = SCRIPT.read_text()
    plan = re.search(r"^PLAN=\((.*)\)$", text, re.M).group(1).split()
    caps = {step.split(":")[0]: int(step.split(":")[1]) for step in plan}
    reserve = int(re.search(r"^RESERVE_S=(\d+)", text, re.M).group(1))
    assert list(caps) == STEPS and sum(caps.values()) + reserve <= 450


def test_source_hash_follows_csrc(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("x")
    first = source_hash.csrc_sha256(str(tmp_path))
    assert first == source_hash.csrc_sha256(str(tmp_path)) and re.fullmatch(r"[0-9a-f]{64}", first)
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("y")
    assert source_hash.csrc_sha256(str(tmp_path)) != first
    (tmp_path / "csrc" / "cuda" / "a.cu").rename(tmp_path / "csrc" / "b.cu")  # same bytes, another path
    (tmp_path / "csrc" / "b.cu").write_text("x")
    assert source_hash.csrc_sha256(str(tmp_path)) != first


def test_max_errors_flags_unwritten_outputs():
    expected = torch.tensor([1.0, -2.0, 4.0])
    got = torch.tensor([1.0, float("nan"), 4.5])
    errors = _common.max_errors(got, expected)
    assert errors == {"max_abs_err": 0.5, "max_rel_err": 0.125, "nan_extra": 1}
    assert _common.max_errors(torch.zeros(2), torch.zeros(3))["shape_mismatch"]


def test_summary_reads_junit_sanitizer_and_steps(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "sanitizer").mkdir(parents=True)
    out.mkdir()
    (work / "steps.tsv").write_text("step\tstatus\tseconds\tbudget_s\tgiven_s\tnote\nenv\tok\t2\t15\t15\t\n"
                                    "e2e\tskipped\t0\t60\t0\tneeds 20 s, 3 s left\n")  # fmt: skip
    (work / "sanitizer" / "result.tsv").write_text("memcheck\t0\t========= ERROR SUMMARY: 0 errors\n")
    (out / "pytest-cuda.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.ops.t" name="a"><failure/></testcase><testcase classname="tests.ops.t" name="b"/>'
        "</testsuite></testsuites>"
    )
    data = summary.build(work, out, dry_run=False)
    assert data["plan_total_s"] == 75 and data["steps"][1]["note"] == "needs 20 s, 3 s left"
    assert data["steps"][0] == {"step": "env", "status": "ok", "seconds": 2, "budget_s": 15, "given_s": 15, "note": ""}
    assert data["pytest_cuda"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "failed": ["tests.ops.t::a"]}
    assert data["sanitizer"]["memcheck"] == {"exit": "0", "summary": "========= ERROR SUMMARY: 0 errors"}


def test_correctness_runner_statuses():
    import correctness

    run = correctness.Runner(torch.device("cpu"), _common.Deadline(time.monotonic() + 60, margin_s=0))
    check = correctness._close(torch.ones(4), 1e-3)
    run.case({"op": "unwritten"}, lambda: torch.tensor([1.0, float("nan"), 1.0, 1.0]), check)
    run.case({"op": "right"}, lambda: torch.ones(4), check)
    run.case({"op": "off"}, lambda: torch.full((4,), 1.01), check)

    def unavailable():
        raise RuntimeError("sparse_linear_2to4: the nvrtc backend cannot run here: no CUDA device is visible")

    def broken():
        raise ValueError("wrong shape")

    run.case({"op": "unavailable"}, unavailable, check)
    run.case({"op": "broken"}, broken, check)
    statuses = {c["op"]: c["status"] for c in run.cases}
    assert statuses == {
        "unwritten": "FAIL",
        "right": "pass",
        "off": "FAIL",
        "unavailable": "skipped",
        "broken": "ERROR",
    }
    assert run.cases[0]["nan_extra"] == 1 and run.cases[2]["max_rel_err"] == pytest.approx(0.01)
    assert run.cases[4]["error"] == "ValueError: wrong shape"

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal"):  # nothing after a sticky error can be trusted
        run.case({"op": "sticky"}, sticky, check)
    assert run.cases[-1]["status"] == "ERROR"
    late = correctness.Runner(torch.device("cpu"), _common.Deadline(time.monotonic() - 1))
    late.case({"op": "late"}, lambda: torch.ones(4), check)
    assert late.cases == [{"op": "late", "status": "not run (deadline)"}]


def _probe_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel of a distribution nothing here has installed."""
    import zipfile

    name, version = "prunedm_gpu_probe", "0.1"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as whl:
        for arcname, text in files.items():
            whl.writestr(arcname, text)
        whl.writestr(f"{info}/RECORD", "".join(f"{a},,\n" for a in files) + f"{info}/RECORD,,\n")
    return path


def run_setup(work: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check" / "setup.sh"), str(work), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)  # fmt: skip


def test_setup_installs_missing_wheels_and_refuses_a_stale_prebuilt_extension(tmp_path):
    wheels, prebuilt, work = tmp_path / "whl", tmp_path / "gpu", tmp_path / "work"
    wheels.mkdir()
    prebuilt.mkdir()
    _probe_wheel(wheels)
    suffix = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    (prebuilt / f"_C{suffix}").write_bytes(b"not a library")
    (prebuilt / "BUILD.json").write_text(json.dumps({"csrc_sha256": "0" * 64}))
    result = run_setup(work, GPU_CHECK_WHEELS_DIR=str(wheels), GPU_CHECK_PREBUILT_DIR=str(prebuilt))
    assert "1 carried wheel(s) installed, 0 already present" in result.stdout, result.stdout + result.stderr
    assert "was built from another csrc/" in result.stdout and "not used" in result.stdout
    setup = json.loads((work / "setup.json").read_text())
    assert setup["wheels_installed"] == ["prunedm_gpu_probe-0.1-py3-none-any.whl"]
    # Later steps source env.sh: the wheel's module is importable with its PYTHONPATH, the tree first.
    probe = subprocess.run(["bash", "-c", f". {work / 'env.sh'}; {sys.executable} -c "
                            "'import prunedm_gpu_probe, sys; print(prunedm_gpu_probe.VALUE, sys.path[1])'"],
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert probe.stdout.split() == ["42", str(ROOT)], probe.stderr

    # The same .so with the tree's csrc hash is what the device would copy in (a dry run only says so).
    (prebuilt / "BUILD.json").write_text(json.dumps({"csrc_sha256": source_hash.csrc_sha256(str(ROOT))}))
    result = run_setup(tmp_path / "work2", GPU_CHECK_WHEELS_DIR=str(tmp_path / "none"),
                       GPU_CHECK_PREBUILT_DIR=str(prebuilt))  # fmt: skip
    assert f"would copy {prebuilt}/_C{suffix} into prunedm/ (dry run: left alone)" in result.stdout, result.stdout
    assert not (ROOT / "prunedm" / "kernels").is_symlink()


def _fake_tool(directory: Path, name: str, body: str) -> None:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_sanitizer_step_runs_each_tool_with_its_log(tmp_path):
    # A stand-in compute-sanitizer: records its arguments and environment, runs the program, writes a summary.
    bin_dir, record = tmp_path / "bin", tmp_path / "calls.txt"
    _fake_tool(
        bin_dir,
        "compute-sanitizer",
        f"""
echo "$* caching=$PYTORCH_NO_CUDA_MEMORY_CACHING" >> {record}
while [ "$1" != "{sys.executable}" ]; do
  [ "$1" = --log-file ] && log=$2
  shift
done
"$@" > /dev/null 2>&1; rc=$?
echo "========= ERROR SUMMARY: 0 errors" > "$log"
exit $rc
""",
    )
    out = tmp_path / "out"
    result = run_check("--dry-run", "--only", "sanitizer", "--out", out, timeout=900,
                       env_extra={"PATH": f"{bin_dir}:{os.environ['PATH']}", "GPU_CHECK_TIME_SCALE": "3"})  # fmt: skip
    data = json.loads((out / "summary.json").read_text())
    assert data["sanitizer"] == {tool: {"exit": "0", "summary": "========= ERROR SUMMARY: 0 errors"}
                                 for tool in ("memcheck", "racecheck", "initcheck")}, result.stdout  # fmt: skip
    calls = record.read_text().splitlines()
    assert [c.split()[1] for c in calls] == ["memcheck", "racecheck", "initcheck"]
    assert all(c.endswith("caching=1") and "--error-exitcode 3" in c for c in calls)
    assert "--track-unused-memory no" in calls[2] and "--track-unused-memory" not in calls[0]


def test_env_reads_the_commit_from_files_and_parses_nvidia_smi(tmp_path, monkeypatch):
    import env_info

    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(env_info, "ROOT", tmp_path)
    assert env_info.read_commit()["commit"] == "unknown"
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "packed-refs").write_text(f"# pack-refs\n{commit} refs/heads/main\n")
    assert env_info.read_commit() == {"commit": commit, "source": ".git/packed-refs"}
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text(commit[::-1] + "\n")
    assert env_info.read_commit() == {"commit": commit[::-1], "source": ".git/refs/heads/main"}
    (tmp_path / ".gpu").mkdir()
    (tmp_path / ".gpu" / "BUILD.json").write_text(json.dumps({"commit": commit, "dirty": True}))
    assert env_info.read_commit() == {"commit": commit, "dirty": True, "source": ".gpu/BUILD.json"}

    bin_dir = tmp_path / "bin"
    _fake_tool(
        bin_dir,
        "nvidia-smi",
        """
if [ "$1" = -q ]; then echo "full report"; exit 0; fi
echo "name, driver_version, clocks.sm [MHz]"
echo "NVIDIA H200, 580.65, 1980 MHz"
""",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    args = type("Args", (), {"work": tmp_path})()
    smi = env_info.nvidia_smi(args)
    gpu = {"name": "NVIDIA H200", "driver_version": "580.65", "clocks.sm [MHz]": "1980 MHz"}
    assert smi == {"available": True, "gpus": [gpu]}
    assert (tmp_path / "nvidia-smi-q.txt").read_text() == "full report\n"
