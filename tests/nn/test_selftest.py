"""Kernel self-test and quarantine without a GPU: a fake-GPU harness replaces the device queries and the child
process runner (pass, wrong result, crash, hang); the real runner and the child's checker run on CPU."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from prunedm.nn import SparseFallbackWarning, SparseLinear, _backends, _selftest
from prunedm.ops import sparse_mm

PASS = (0, '{"ok": true, "detail": ""}\n', "")
OUTCOMES = {
    "pass": PASS,
    "wrong": (1, '{"ok": false, "detail": "linear 96x64 m=70 gelu torch.float16: max error 3.5"}\n', ""),
    "crash": (-11, "", "CUDA error: an illegal memory access was encountered\n"),
    "hang": (None, "", ""),
}
EXPECTED_STATUS = {"pass": "pass", "wrong": "fail", "crash": "crash", "hang": "hang"}


class FakeChildren:
    """Stands in for run_child: answers per kernel from `outcomes`, records every child started."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.calls: list[list[str]] = []

    def __call__(self, argv, timeout):
        assert argv[1:4] == ["-m", "prunedm.nn._selftest", "--child"] and timeout > 0
        self.calls.append(argv)
        return OUTCOMES[self.outcomes.get(argv[4], "pass")]


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PRUNEDM_SELFTEST", raising=False)
    monkeypatch.setattr(_selftest, "device_available", lambda: True)
    monkeypatch.setattr(_selftest, "device_count", lambda: 1)
    monkeypatch.setattr(_selftest, "device_identity", lambda device, impl: f"Fake GPU sm_80 driver=13.0 {impl}=abc")
    monkeypatch.setattr(sparse_mm, "sparse_kernel_backend", lambda device, **kwargs: ("extension", ""))
    children = FakeChildren()
    monkeypatch.setattr(_selftest, "run_child", children)
    _selftest.forget_results()
    _backends._warned.clear()
    yield children
    _selftest.forget_results()


@pytest.fixture
def fake_ops(monkeypatch):
    """prunedm.ops as _backends sees it on a usable sm80 GPU."""
    ops = types.SimpleNamespace(
        sparse_linear_2to4=None,
        sparse_conv2d_2to4=None,
        sparse_kernels_available=lambda device, **kwargs: (True, ""),
        sparse_kernel_backend=lambda device, **kwargs: ("extension", ""),
    )
    monkeypatch.setattr(_backends, "ops", ops)
    return ops


def test_passing_kernels_are_tested_once_then_remembered_and_cached(fake_gpu, tmp_path):
    rows = _selftest.run_selftest()
    assert [(r["kernel"], r["status"], r["source"]) for r in rows] == [
        ("sparse_linear_2to4", "pass", "tested"),
        ("sparse_conv2d_2to4", "pass", "tested"),
    ]
    assert len(fake_gpu.calls) == 2 and fake_gpu.calls[0][4:] == ["sparse_linear_2to4", "extension", "0"]
    assert [r["source"] for r in _selftest.run_selftest()] == ["memory", "memory"]
    _selftest.forget_results()  # a new process: the cache file answers
    assert [r["source"] for r in _selftest.run_selftest()] == ["cache", "cache"]
    assert len(fake_gpu.calls) == 2
    data = json.loads((tmp_path / "selftest-v1.json").read_text())
    assert data["format"] == "prunedm.selftest" and data["version"] == 1
    entry = data["entries"]["Fake GPU sm_80 driver=13.0 extension=abc"]
    assert {k: v["status"] for k, v in entry.items()} == {"sparse_linear_2to4": "pass", "sparse_conv2d_2to4": "pass"}
    assert [r["source"] for r in _selftest.run_selftest(force=True)] == ["tested", "tested"]
    assert len(fake_gpu.calls) == 4


@pytest.mark.parametrize("outcome", ["wrong", "crash", "hang"])
def test_a_failing_kernel_is_quarantined_with_one_warning(outcome, fake_gpu, fake_ops):
    fake_gpu.outcomes["sparse_linear_2to4"] = outcome
    cuda = torch.device("cuda", 0)
    with pytest.warns(SparseFallbackWarning, match=r"sparse_linear_2to4 kernel \(extension\) is quarantined") as w:
        problem = _backends.prunedm_backend_problem(cuda, torch.float16)
    assert len(w) == 1 and EXPECTED_STATUS[outcome] in str(w[0].message)
    key, reason = problem
    assert key == "quarantined-sparse_linear_2to4-extension" and f"gave {EXPECTED_STATUS[outcome]}" in reason
    # The conv kernel passed: it is still chosen. Nothing is tested twice, nothing warned twice.
    assert _backends.prunedm_backend_problem(cuda, torch.float16, conv_in_channels=32) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.prunedm_backend_problem(cuda, torch.float16) == problem
    assert len(fake_gpu.calls) == 2
    rows = {r["kernel"]: r for r in _selftest.run_selftest()}
    assert rows["sparse_linear_2to4"]["status"] == EXPECTED_STATUS[outcome]
    assert rows["sparse_conv2d_2to4"]["status"] == "pass"


def test_a_quarantined_kernel_is_never_a_layer_path(fake_gpu, fake_ops):
    fake_gpu.outcomes["sparse_linear_2to4"] = "crash"
    layer = SparseLinear(64, 96, dtype=torch.float16, backend="prunedm")
    with pytest.warns(SparseFallbackWarning, match="quarantined"):
        problem = layer._runtime._prepare_prunedm(layer, torch.device("cuda", 0), torch.float16)
    assert problem[0] == "quarantined-sparse_linear_2to4-extension" and "prunedm" not in layer._runtime.paths
    fake_gpu.outcomes.clear()
    _selftest.forget_results()  # a new process: the cache still says crash, nothing is tested again
    again = layer._runtime._prepare_prunedm(layer, torch.device("cuda", 0), torch.float16)
    assert again == problem and "prunedm" not in layer._runtime.paths and len(fake_gpu.calls) == 1


def test_results_in_the_cache_are_honoured_and_bad_entries_retested(fake_gpu, tmp_path):
    identity = "Fake GPU sm_80 driver=13.0 extension=abc"
    cache = {"format": "prunedm.selftest", "version": 1, "entries": {
        identity: {"sparse_linear_2to4": {"status": "hang", "detail": "no result within 300 s"},
                   "sparse_conv2d_2to4": {"status": 3, "detail": []}},
        "other GPU": ["not", "an", "object"]}}  # fmt: skip
    (tmp_path / "selftest-v1.json").write_text(json.dumps(cache))
    with pytest.warns(UserWarning, match="ignored malformed entries"):
        rows = _selftest.run_selftest()
    assert [(r["status"], r["source"]) for r in rows] == [("hang", "cache"), ("pass", "tested")]
    assert [c[4] for c in fake_gpu.calls] == ["sparse_conv2d_2to4"]
    (tmp_path / "selftest-v1.json").write_text("[1, 2")  # garbage: ignored, rewritten
    _selftest.forget_results()
    with pytest.warns(UserWarning, match="unreadable"):
        assert {r["status"] for r in _selftest.run_selftest()} == {"pass"}
    assert json.loads((tmp_path / "selftest-v1.json").read_text())["format"] == "prunedm.selftest"


def test_switched_off_by_env_var(fake_gpu, fake_ops, monkeypatch):
    monkeypatch.setenv("PRUNEDM_SELFTEST", "0")
    fake_gpu.outcomes["sparse_linear_2to4"] = "crash"
    assert _backends.prunedm_backend_problem(torch.device("cuda", 0), torch.float16) is None
    assert fake_gpu.calls == []


def test_main_prints_the_table_and_fails_on_a_quarantined_kernel(fake_gpu, capsys):
    fake_gpu.outcomes["sparse_conv2d_2to4"] = "wrong"
    assert _selftest.main([]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["device", "kernel", "implementation", "status", "source", "detail"]
    assert lines[1].split()[:5] == ["cuda:0", "sparse_linear_2to4", "extension", "pass", "tested"]
    assert lines[2].split()[:5] == ["cuda:0", "sparse_conv2d_2to4", "extension", "fail", "tested"]
    assert "max error 3.5" in lines[2]
    fake_gpu.outcomes.clear()
    assert _selftest.main(["--force"]) == 0


def test_no_gpu_table(monkeypatch, capsys):
    monkeypatch.setattr(_selftest, "device_available", lambda: False)
    assert _selftest.main([]) == 0
    assert "no CUDA device is visible" in capsys.readouterr().out


def test_real_runner_reports_hang_and_crash():
    code, _, _ = _selftest.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
    assert code is None
    code, out, _ = _selftest.run_child([sys.executable, "-c", "import os; print('x'); os.abort()"], timeout=30.0)
    assert code < 0 and out == "x\n"


@pytest.mark.parametrize("outcome", ["pass", "wrong", "crash", "hang"])
def test_child_outcomes_are_classified(outcome, monkeypatch):
    monkeypatch.setattr(_selftest, "run_child", lambda argv, timeout: OUTCOMES[outcome])
    result = _selftest._test_in_child("sparse_linear_2to4", "extension", 0)
    assert result["status"] == EXPECTED_STATUS[outcome]
    if outcome == "crash":
        assert "signal 11" in result["detail"] and "illegal memory access" in result["detail"]


@pytest.mark.usefixtures("one_thread_module")
def test_child_checker_passes_correct_kernels_and_catches_wrong_ones(monkeypatch):
    from prunedm import ops

    cpu = torch.device("cpu")
    assert _selftest.check_kernel("sparse_linear_2to4", "reference", cpu) == ""
    assert _selftest.check_kernel("sparse_conv2d_2to4", "reference", cpu) == ""
    real = ops.sparse_linear_2to4
    monkeypatch.setattr(ops, "sparse_linear_2to4", lambda *a, **k: real(*a, **k) * 1.1)
    assert _selftest.check_kernel("sparse_linear_2to4", "reference", cpu).startswith("linear 32x32 m=1 none")
    monkeypatch.setattr(ops, "sparse_conv2d_2to4", lambda *a, **k: torch.zeros(1))
    assert "shape [1]" in _selftest.check_kernel("sparse_conv2d_2to4", "reference", cpu)


def test_identity_names_gpu_capability_driver_and_build_once_per_device(monkeypatch):
    monkeypatch.setattr(_selftest, "_IDENTITIES", {})
    drivers = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(_selftest, "driver_version", lambda: drivers.append(1) or "13.0")
    monkeypatch.setattr(_selftest, "build_hash", lambda impl: "0123abcd")
    for _ in range(3):
        identity = _selftest.device_identity(torch.device("cuda", 1), "extension")
    assert identity == "NVIDIA H200 sm_90 driver=13.0 extension=0123abcd" and len(drivers) == 1
    assert _selftest.device_identity(torch.device("cuda", 1), "nvrtc").endswith("nvrtc=0123abcd")


def test_build_hash_follows_the_extension_bytes(tmp_path, monkeypatch):
    from prunedm import _ext

    library = tmp_path / "_C.so"
    library.write_bytes(b"build one")
    monkeypatch.setattr(_ext, "_LOADED", (types.SimpleNamespace(__file__=str(library)), ""))
    monkeypatch.setattr(_selftest, "_BUILD_HASHES", {})
    first = _selftest.build_hash("extension")
    library.write_bytes(b"build two")
    monkeypatch.setattr(_selftest, "_BUILD_HASHES", {})
    assert len(first) == 16 and _selftest.build_hash("extension") != first
