"""backend="auto": the timing decision per shape, its disk cache (reload, concurrency), PRUNEDM_AUTOTUNE=0,
torch.compile, and the report; on CPU with torch's sparse weight faked by the padded dense matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from prunedm import measure
from prunedm.nn import SparseFallbackWarning, SparseLinear, _autotune, _backends, sparsify
from prunedm.nn import _packing as packing

ROOT = Path(__file__).resolve().parents[2]


def _dense_as_sparse(values, meta, rows, cols):
    """Stands in for torch's sparse tensor on CPU, so the torch path is a candidate auto can time."""
    rows_p, cols_p = values.shape[0], values.shape[1] * 2
    return packing.unpack(values, meta, rows_p, cols_p).contiguous(), rows_p, cols_p, 0


class FakeTimer:
    """Times by path name from a table (ms), optionally per batch bucket; counts calls; runs fn once."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, fn, device, path):
        fn()
        self.calls.append(path)
        value = self.table[path]
        return value(len(self.calls)) if callable(value) else value


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEDM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PRUNEDM_AUTOTUNE", raising=False)
    _autotune.clear_autotune_cache(disk=False)
    _backends._warned.clear()
    yield tmp_path
    _autotune.clear_autotune_cache(disk=False)


@pytest.fixture
def fake_torch_kernel(monkeypatch):
    monkeypatch.setattr(_backends, "torch_backend_problem", lambda device, dtype: None)
    monkeypatch.setattr(_backends, "build_semi_structured", _dense_as_sparse)


def _layer(in_features=64, out_features=96, seed=0):
    torch.manual_seed(seed)
    return SparseLinear.from_dense(nn.Linear(in_features, out_features), backend="auto")


def _x(rows, in_features=64, seed=1):
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))


def test_batch_bucket_and_pick_fastest():
    assert [_autotune.batch_bucket(n) for n in (0, 1, 2, 3, 4, 5, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 128]
    with pytest.raises(ValueError, match="rows"):
        _autotune.batch_bucket(-1)
    assert _autotune.pick_fastest({"dense": 1.0, "torch": 0.5, "prunedm": 0.7}) == "torch"
    assert _autotune.pick_fastest({"dense": 1.0, "torch": 0.99}) == "dense"  # within noise: dense
    assert _autotune.pick_fastest({"dense": 1.0, "torch": 1.0}) == "dense"
    with pytest.raises(ValueError, match="dense"):
        _autotune.pick_fastest({"torch": 1.0})


def test_auto_picks_the_fastest_per_bucket_and_persists(cache_dir, fake_torch_kernel, monkeypatch):
    # torch is faster on small batches, dense on large ones (the padded-GEMV case the other way round).
    timer = FakeTimer({"dense": 1.0, "torch": 0.4})
    monkeypatch.setattr(_autotune, "TIMER", timer)
    layer = _layer()
    small = layer(_x(3))
    assert layer.last_run[0] == "torch" and "auto picked torch for m4" in layer.last_run[1]
    assert sorted(timer.calls) == ["dense", "torch"]
    torch.testing.assert_close(small, layer.to_dense()(_x(3)))
    layer(_x(4))  # same bucket: no new timing
    assert len(timer.calls) == 2
    timer.table = {"dense": 1.0, "torch": 2.5}
    big = layer(_x(40))
    assert layer.last_run[0] == "dense" and "m64" in layer.last_run[1]
    assert layer._runtime.dense_cache is not None  # dense won: its weight is kept, counted in weight_nbytes
    assert layer.weight_nbytes > layer.values.nbytes + layer.meta.nbytes
    torch.testing.assert_close(big, layer.to_dense()(_x(40)))
    assert layer.auto_decisions() == {
        "m4": {"backend": "torch", "times_ms": {"dense": 1.0, "torch": 0.4}, "source": "timed"},
        "m64": {"backend": "dense", "times_ms": {"dense": 1.0, "torch": 2.5}, "source": "timed"},
    }
    data = json.loads((cache_dir / "autotune-v1.json").read_text())
    assert data["format"] == "prunedm.autotune" and data["version"] == 1
    (context,) = data["entries"]
    assert f"torch={torch.__version__}" in context and "prunedm=" in context and "device=cpu" in context
    entries = data["entries"][context]["linear 96x64 bias=True float32"]
    assert {k: v["backend"] for k, v in entries.items()} == {"m4": "torch", "m64": "dense"}
    info = _autotune.autotune_cache_info()
    assert info["decisions"] == 2 and info["timed"] == 2 and info["path"] == str(cache_dir / "autotune-v1.json")

    # A second layer of the same shape in this process reuses the decisions: no timing.
    other = _layer(seed=5)
    other(_x(3, seed=3))
    other(_x(33))
    assert len(timer.calls) == 4 and other.auto_decisions()["m64"]["source"] == "cache"


def test_decisions_reload_in_a_new_process(cache_dir, fake_torch_kernel, monkeypatch):
    monkeypatch.setattr(_autotune, "TIMER", FakeTimer({"dense": 1.0, "torch": 0.25}))
    _layer()(_x(6))
    script = textwrap.dedent(
        """
        import json, torch, torch.nn as nn
        from prunedm.nn import SparseLinear, _autotune, _backends
        from prunedm.nn import _packing as packing

        def fake(values, meta, rows, cols):
            r, c = values.shape[0], values.shape[1] * 2
            return packing.unpack(values, meta, r, c).contiguous(), r, c, 0

        def no_timing(fn, device, path):
            raise AssertionError("timed although the decision is cached")

        _backends.torch_backend_problem = lambda device, dtype: None
        _backends.build_semi_structured = fake
        _autotune.TIMER = no_timing
        torch.manual_seed(0)
        layer = SparseLinear.from_dense(nn.Linear(64, 96), backend="auto")
        layer(torch.randn(7, 64))
        print(json.dumps({"run": layer.last_run, "decisions": layer.auto_decisions(),
                          "info": _autotune.autotune_cache_info()}))
        """
    )
    env = {**os.environ, "PRUNEDM_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["run"][0] == "torch" and "cached" in result["run"][1]
    expected = {"backend": "torch", "times_ms": {"dense": 1.0, "torch": 0.25}, "source": "cache"}
    assert result["decisions"]["m8"] == expected
    assert result["info"]["timed"] == 0 and result["info"]["decisions"] == 1


def test_concurrent_writers_do_not_corrupt_or_lose_entries(cache_dir):
    script = textwrap.dedent(
        """
        import sys
        from prunedm.nn import _autotune
        worker = sys.argv[1]
        for i in range(25):
            _autotune.CACHE.put("ctx", f"layer-{worker}", f"m{i}", {"backend": "dense", "times_ms": {"dense": i}})
        """
    )
    env = {**os.environ, "PRUNEDM_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(w)], env=env, stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    data = json.loads((cache_dir / "autotune-v1.json").read_text())
    layers = data["entries"]["ctx"]
    assert sorted(layers) == [f"layer-{w}" for w in range(4)]
    assert all(len(inputs) == 25 for inputs in layers.values())
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".autotune")]  # no tmp files left behind


def test_unreadable_cache_is_rewritten(cache_dir):
    (cache_dir / "autotune-v1.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        _autotune.CACHE.put("ctx", "layer", "m1", {"backend": "dense"})
    assert json.loads((cache_dir / "autotune-v1.json").read_text())["entries"] == {
        "ctx": {"layer": {"m1": {"backend": "dense"}}}
    }
    _autotune.clear_autotune_cache()
    assert not (cache_dir / "autotune-v1.json").exists() and _autotune.autotune_cache_info()["decisions"] == 0


def test_timing_disabled_by_env_var(cache_dir, fake_torch_kernel, monkeypatch):
    timer = FakeTimer({"dense": 0.1, "torch": 10.0})
    monkeypatch.setattr(_autotune, "TIMER", timer)
    monkeypatch.setenv("PRUNEDM_AUTOTUNE", "0")
    layer = _layer()
    layer(_x(5))
    assert layer.last_run[0] == "torch" and "PRUNEDM_AUTOTUNE=0" in layer.last_run[1]
    assert timer.calls == [] and not (cache_dir / "autotune-v1.json").exists()
    assert _autotune.autotune_cache_info()["timing_enabled"] is False


def test_failing_sparse_path_while_timing_falls_back_with_one_warning(cache_dir, monkeypatch):
    monkeypatch.setattr(_backends, "torch_backend_problem", lambda device, dtype: None)
    # A weight of the wrong shape: F.linear raises, as a kernel that refuses this GPU or shape would.
    monkeypatch.setattr(_backends, "build_semi_structured", lambda v, m, r, c: (torch.zeros(1, 1), 96, 64, 0))
    layer = _layer()
    with pytest.warns(SparseFallbackWarning, match="kernel raised"):
        out = layer(_x(3))
    assert layer.last_run[0] == "dense" and "raised" in layer.last_run[1] and layer._runtime.paths == []
    torch.testing.assert_close(out, layer.to_dense()(_x(3)))


def test_compile_uses_cached_decisions_and_never_times(cache_dir, fake_torch_kernel, monkeypatch):
    def no_timing(fn, device, path):
        raise AssertionError("timed while compiling")

    monkeypatch.setattr(_autotune, "TIMER", no_timing)
    layer = _layer()
    layer.prepare()
    assert layer._static_path(_x(3)) == "dense"  # unknown shape while compiling: dense
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(_x(3)), layer.to_dense()(_x(3)))
    layer._runtime.auto[(4,)] = "torch"  # as a decision loaded from the cache would be
    assert layer._static_path(_x(3)) == "torch"
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(_x(3)), layer.to_dense()(_x(3)))


def test_report_says_what_auto_picked(cache_dir, fake_torch_kernel, monkeypatch):
    monkeypatch.setattr(_autotune, "TIMER", FakeTimer({"dense": 1.0, "torch": 0.5}))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    report = sparsify(model)
    model(_x(2))
    decisions = report.auto_decisions()
    assert set(decisions) == {"0", "2"} and all(d["m2"]["backend"] == "torch" for d in decisions.values())
    assert "auto picked torch for m2" in str(report)


# -- batched timings and the noise margin --------------------------------------------------------------------


def test_pick_fastest_needs_an_advantage_beyond_the_noise():
    assert _autotune.pick_fastest({"dense": 1.0, "torch": 0.96}) == "dense"  # 4% < the 5% floor
    assert _autotune.pick_fastest({"dense": 1.0, "torch": 0.90}) == "torch"
    assert _autotune.pick_fastest({"dense": 1.0, "torch": 0.90}, noise=0.05) == "dense"  # 10% < 3 x 5%
    assert _autotune.pick_fastest({"dense": 1.0, "torch": 0.80}, noise=0.05) == "torch"
    times = _autotune.Timings(dense=1.0, torch=0.85)
    times.noise = 0.1
    assert _autotune.pick_fastest(times) == "dense"


def test_time_candidates_measures_noise_from_the_dense_spread(monkeypatch):
    samples = {"dense": [1.0, 1.2, 0.9, 1.0, 1.1], "torch": [0.85, 0.86, 0.84, 0.85, 0.85]}
    monkeypatch.setattr(_autotune, "TIMER", lambda fn, device, path: samples[path])
    times, errors = _autotune.time_candidates({"dense": lambda: None, "torch": lambda: None}, torch.device("cpu"))
    assert errors == {} and dict(times) == {"dense": 1.0, "torch": 0.85}
    assert times.noise == pytest.approx(0.3)  # (1.2 - 0.9) / 1.0
    assert _autotune.pick_fastest(times) == "dense"  # 15% faster, but the dense timings spread 30%
    samples["dense"] = [1.0, 1.01, 0.99, 1.0, 1.0]
    times, _ = _autotune.time_candidates({"dense": lambda: None, "torch": lambda: None}, torch.device("cpu"))
    assert times.noise == pytest.approx(0.02) and _autotune.pick_fastest(times) == "torch"


def test_auto_on_a_noisy_machine_keeps_dense(cache_dir, fake_torch_kernel, monkeypatch):
    samples = {"dense": [1.0, 1.3, 0.8, 1.0, 1.1], "torch": [0.8] * 5}
    monkeypatch.setattr(_autotune, "TIMER", lambda fn, device, path: (fn(), samples[path])[1])
    layer = _layer()
    layer(_x(3))
    assert layer.last_run[0] == "dense" and layer.auto_decisions()["m4"]["times_ms"] == {"dense": 1.0, "torch": 0.8}


class FakeClock:
    """perf_counter under measure_samples_ms (prunedm.measure.batch_ms): each call of fn adds `per_call_ms`."""

    def __init__(self, per_call_ms):
        self.now, self.per_call_ms, self.calls = 0.0, per_call_ms, 0

    def __call__(self):
        return self.now

    def fn(self):
        self.calls += 1
        self.now += self.per_call_ms / 1e3


def test_measurements_batch_many_launches(monkeypatch):
    clock = FakeClock(per_call_ms=0.01)  # a 10 us layer: one launch is far below the timer's useful resolution
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    samples = _autotune.measure_samples_ms(clock.fn, torch.device("cpu"), "dense")
    assert len(samples) == _autotune.SAMPLES["cpu"] and samples == pytest.approx([0.01] * len(samples))
    # Calibrated towards BATCH_TARGET_MS (5 ms on CPU): 1, 16, 256, then 512 launches (5.12 ms) per sample.
    assert clock.calls == _autotune.WARMUP_CALLS + (1 + 16 + 256 + 512) + len(samples) * 512
    slow = FakeClock(per_call_ms=20.0)  # a slow layer: one launch per sample
    monkeypatch.setattr(measure.time, "perf_counter", slow)
    assert _autotune.measure_samples_ms(slow.fn, torch.device("cpu")) == pytest.approx([20.0] * len(samples))
    assert slow.calls == _autotune.WARMUP_CALLS + 1 + len(samples)
    assert _autotune.measure_ms(slow.fn, torch.device("cpu")) == pytest.approx(20.0)


# -- a cache is a cache: wrong types never reach the forward ----------------------------------------------


BAD_ENTRIES = [
    ["not", "an", "object"],
    {"input": "m4", "backend": "torch", "times_ms": {"dense": 1.0, "torch": 0.5}},
    {"input": [4], "backend": "cutlass", "times_ms": {"dense": 1.0, "torch": 0.5}},
    {"input": [4], "backend": "torch", "times_ms": {"dense": "fast", "torch": 0.5}},
    {"input": [4], "backend": "torch", "times_ms": [1.0, 0.5]},
    {"input": [4], "cslt": "alg 3"},
    {"input": [4], "cslt": [1, 2]},
    42,
]


@pytest.mark.parametrize("bad", BAD_ENTRIES, ids=range(len(BAD_ENTRIES)))
@pytest.mark.parametrize("context", ["this", "other"])
def test_malformed_cache_entries_are_ignored_with_one_warning(bad, context, cache_dir, fake_torch_kernel, monkeypatch):
    timer = FakeTimer({"dense": 1.0, "torch": 0.4})
    monkeypatch.setattr(_autotune, "TIMER", timer)
    layer = _layer()
    here = _autotune.context_key(torch.device("cpu")) if context == "this" else "torch=0.1;device=another GPU"
    signature = "linear 96x64 bias=True float32"
    entries = {here: {signature: {"m4": bad}}, "ctx": {"layer": {"m1": {"backend": "dense"}}}}
    path = cache_dir / "autotune-v1.json"
    path.write_text(json.dumps({"format": "prunedm.autotune", "version": 1, "entries": entries}))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(_x(3))
    messages = [str(w.message) for w in caught if "autotune cache" in str(w.message)]
    assert len(messages) == 1 and "ignored 1 malformed entry" in messages[0], messages
    assert layer.last_run[0] == "torch" and timer.calls == ["dense", "torch"]  # timed again
    torch.testing.assert_close(out, layer.to_dense()(_x(3)))
    rewritten = json.loads(path.read_text())["entries"]
    assert rewritten["ctx"] == {"layer": {"m1": {"backend": "dense"}}}  # good entries kept
    here_now = _autotune.context_key(torch.device("cpu"))
    assert rewritten[here_now][signature]["m4"]["backend"] == "torch"
    if context == "other":
        assert here not in rewritten  # the bad entry is gone


def test_cache_whose_entries_are_a_list_is_rebuilt(cache_dir, fake_torch_kernel, monkeypatch):
    monkeypatch.setattr(_autotune, "TIMER", FakeTimer({"dense": 1.0, "torch": 0.4}))
    path = cache_dir / "autotune-v1.json"
    path.write_text(json.dumps({"format": "prunedm.autotune", "version": 1, "entries": [1, 2, 3]}))
    with pytest.warns(UserWarning, match="malformed"):
        _layer()(_x(3))
    assert list(json.loads(path.read_text())["entries"].values())[0]["linear 96x64 bias=True float32"]["m4"]
