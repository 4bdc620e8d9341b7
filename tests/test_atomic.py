"""prunedm._atomic: whole-or-nothing files and directories, and cleanup after a killed writer."""

from __future__ import annotations

import pytest

from prunedm import _atomic


def test_atomic_file_replaces_or_leaves_nothing(tmp_path):
    target = tmp_path / "a.json"
    _atomic.write_text_atomic(target, "one")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_dir_swaps_a_complete_directory(tmp_path):
    target = tmp_path / "model"
    with _atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_dir(target) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("killed")
    assert (target / "f").read_text() == "old"
    with _atomic.atomic_dir(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_remove_stale_temps(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / f".keep.txt{_atomic.TEMP_MARK}abc").write_text("partial")
    sub = tmp_path / "sub"
    stale_dir = sub / f".model{_atomic.TEMP_MARK}xyz"
    stale_dir.mkdir(parents=True)
    old = tmp_path / f".saved{_atomic.TEMP_MARK}old-q1"
    old.mkdir()
    (old / "f").write_text("complete old save")
    removed = _atomic.remove_stale_temps(tmp_path)
    assert {p.name for p in removed} == {f".keep.txt{_atomic.TEMP_MARK}abc", stale_dir.name}
    assert (tmp_path / "saved" / "f").read_text() == "complete old save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "saved", "sub"]


def test_bench_ops_resolves_device_auto_on_a_cpu_machine(monkeypatch):
    import torch

    from prunedm.bench import ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = {}

    def bench_shape(label, shape, dtype, device):
        seen["device"] = device
        return []

    monkeypatch.setattr(ops, "bench_shape", bench_shape)
    with pytest.raises(IndexError):  # no rows: the device was resolved before the first shape ran
        ops.main(["--device", "auto", "--quick", "--out", "/nonexistent"])
    assert seen["device"] == torch.device("cpu")


def test_sample_grid_is_written_through_a_recognised_temporary(tmp_path, monkeypatch):
    import torch

    from prunedm.eval import sampling

    seen = []
    real = _atomic.atomic_file

    def spy(path, suffix=""):
        seen.append((path, suffix))
        return real(path, suffix)

    monkeypatch.setattr(sampling, "atomic_file", spy)
    sampling.save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png")
    assert seen == [(tmp_path / "grid.png", ".png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
