"""bench.overhead: one short run writes a row per shape and path, each timed, with the path the layer really took.

The timings themselves are not asserted (a shared CPU); the rows, the paths and the outputs are."""

import json

import pytest

from prunedm.bench import overhead


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_thread_module):
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    assert overhead.main(["--out", str(out), "--min-run-time", "0.001"]) == 0
    return json.loads(out.read_text())


def test_rows_cover_every_shape_and_variant(result):
    rows = result["rows"]
    assert [(row["shape"], row["variant"]) for row in rows] == [
        (shape, variant) for shape, *_ in overhead._shapes() for variant in overhead.VARIANTS
    ]
    for row in rows:
        assert row["median_us"] > 0 and row["q20_us"] <= row["median_us"] <= row["q80_us"]
        if row["variant"] == "dense":
            assert row["ratio_to_dense"] == 1.0
    assert result["environment"]["device"].startswith("cpu") and "commit" in result["environment"]
    assert result["target"]["cache_dense_max_ratio"] == 1.15


def test_paths_are_the_ones_named(result):
    by = {(row["shape"], row["variant"]): row for row in result["rows"]}
    linear, conv16, conv32 = (shape for shape, *_ in overhead._shapes())
    for shape in (linear, conv16, conv32):
        assert by[shape, "cache_dense"]["path"] == "dense" and by[shape, "decompress"]["path"] == "dense"
        # Each sparse row computes what nn.Linear / nn.Conv2d holding the 2:4-masked weight computes.
        for variant in ("dense", "cache_dense", "decompress", "prunedm"):
            assert by[shape, variant]["max_abs_err"] < 1e-5, (shape, variant)
    for shape in (linear, conv32):
        assert by[shape, "prunedm"]["path"] == by[shape, "prunedm-stub"]["path"] == "prunedm"
        assert "max_abs_err" not in by[shape, "prunedm-stub"]
    assert by[conv16, "prunedm"]["path"] == "dense" and "multiples of 32" in by[conv16, "prunedm"]["note"]


def test_stub_is_undone(one_thread_module):
    import torch

    from prunedm.ops import _backends, reference

    cpu, out = torch.device("cpu"), torch.zeros(1)
    with overhead._stubbed_kernel("sparse_linear_2to4", out):
        assert _backends.resolve("sparse_linear_2to4", "reference", cpu).fn(1, 2) is out
    assert _backends.resolve("sparse_linear_2to4", "reference", cpu).fn is reference.sparse_linear_2to4_ref
