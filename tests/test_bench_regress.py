"""bench.regress: rows matched by identity, speedup drops beyond --max-drop fail, unreadable input exits 2."""

from __future__ import annotations

import json

import pytest

from prunedm.bench.common import write_results
from prunedm.bench.regress import compare, load_rows, main, speedup


def op_row(op, backend, speedup_value, shape="dit-xl2.qkv 3456x1152", dtype="float16"):
    return {"op": op, "shape": shape, "dtype": dtype, "backend": backend, "median_ms": 1.0,
            "speedup_vs_baseline": speedup_value}  # fmt: skip


ENV = {"device": "cpu (x86_64, 2 threads)", "commit": "abc"}


def write(tmp_path, name, rows, env=ENV):
    json_path, _ = write_results(tmp_path, name, env, rows)
    return json_path


def test_speedup_reads_every_row_kind():
    assert speedup({"speedup_vs_dense": 2.0}) == 2.0
    assert speedup({"speedup_vs_baseline": 0.5}) == 0.5
    assert speedup({"ratio_to_dense": 0.25}) == 4.0  # a time ratio: lower is faster
    assert speedup({"latency_ratio": 2.0}) == 0.5
    assert speedup({"median_ms": 3.0}) is None


def test_no_regression_within_max_drop(tmp_path, capsys):
    base = write(
        tmp_path / "a", "ops", [op_row("nm_mask", "extension", 4.0), op_row("compress_2to4", "extension", 2.0)]
    )
    cur = write(tmp_path / "b", "ops", [op_row("nm_mask", "extension", 3.5), op_row("compress_2to4", "extension", 2.6)])
    assert main(["--baseline", str(base), "--current", str(cur), "--max-drop", "0.15"]) == 0
    out = capsys.readouterr().out
    assert "2 row(s) compared, 0 regression(s)" in out and "-12.5%" in out and "+30.0%" in out


def test_regression_beyond_max_drop_exits_1(tmp_path, capsys):
    base = write(tmp_path / "a", "ops", [op_row("nm_mask", "extension", 4.0), op_row("nm_mask", "reference", 1.0)])
    cur = write(tmp_path / "b", "ops", [op_row("nm_mask", "extension", 3.0), op_row("nm_mask", "reference", 1.0)])
    assert main(["--baseline", str(base), "--current", str(cur)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "-25.0%" in out and "1 regression(s)" in out
    assert main(["--baseline", str(base), "--current", str(cur), "--max-drop", "0.3"]) == 0


def test_missing_rows_are_reported_not_failed(tmp_path, capsys):
    base = write(tmp_path / "a", "ops", [op_row("nm_mask", "extension", 4.0), op_row("nm_mask", "triton", 5.0)])
    cur = write(
        tmp_path / "b", "ops", [op_row("nm_mask", "extension", 4.1), op_row("decompress_2to4", "extension", 1.0)]
    )
    assert main(["--baseline", str(base), "--current", str(cur)]) == 0
    out = capsys.readouterr().out
    assert "1 row(s) only in the baseline:" in out and "nm_mask dit-xl2.qkv 3456x1152 float16 triton" in out
    assert "1 row(s) only in the current run:" in out and "decompress_2to4" in out


def test_identity_separates_dtype_device_and_model_rows(tmp_path):
    fp16, bf16 = op_row("nm_mask", "extension", 4.0), op_row("nm_mask", "extension", 1.0, dtype="bfloat16")
    base = load_rows(write(tmp_path / "a", "ops", [fp16, bf16]))
    cur = load_rows(write(tmp_path / "b", "ops", [fp16, {**bf16, "speedup_vs_baseline": 0.5}]))
    report = compare(base, cur, 0.15)
    assert [e["key"][2] for e in report["regressions"]] == [("dtype", "bfloat16")]
    gpu = load_rows(write(tmp_path / "c", "ops", [{**fp16, "speedup_vs_baseline": 0.1}], {"device": "H100"}))
    assert compare(base, gpu, 0.15)["compared"] == []  # another device is another row
    pruning = {"model": "unet", "variant": "channels-0.3", "batch": 8, "dtype": "float32", "device": "cpu",
               "speedup_vs_dense": 1.6}  # fmt: skip
    report = compare([pruning], [{**pruning, "speedup_vs_dense": 1.2}], 0.15)
    assert len(report["regressions"]) == 1 and report["regressions"][0]["change"] == pytest.approx(-0.25)


def test_current_may_be_a_directory_of_results(tmp_path):
    base = write(tmp_path / "a", "ops", [op_row("nm_mask", "extension", 4.0)])
    write(tmp_path / "b", "ops", [op_row("nm_mask", "extension", 4.0)])
    write(tmp_path / "b", "layers", [{"layer": "l", "op": "linear", "shape": "8x8", "dtype": "float16",
                                      "backend": "dense", "ratio_to_dense": 1.0}])  # fmt: skip
    (tmp_path / "b" / "notes.json").write_text(json.dumps({"not": "results"}))
    assert len(load_rows(tmp_path / "b")) == 2
    assert main(["--baseline", str(base), "--current", str(tmp_path / "b")]) == 0


def test_unreadable_input_exits_2(tmp_path, capsys):
    good = write(tmp_path, "ops", [op_row("nm_mask", "extension", 4.0)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([1, 2]))
    assert main(["--baseline", str(good), "--current", str(bad)]) == 2
    assert main(["--baseline", str(tmp_path / "missing.json"), "--current", str(good)]) == 2
    assert main(["--baseline", str(wrong), "--current", str(good)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--baseline", str(good), "--current", str(tmp_path / "empty")]) == 2
    assert "bench.regress:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_drop"):
        compare([], [], 1.5)
