"""bench.quality_seeds: aggregation over seeds, the spread rule, resume, and the README block it regenerates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prunedm.bench import quality_seeds as qs
from prunedm.bench.quality import Budget

ROOT = Path(__file__).resolve().parents[1]


def _row(variant: str, seed: int, fid: float, steps: int = 100, acc: float = 0.5) -> dict:
    return {"variant": variant, "finetune_steps": steps, "fid": fid, "classifier_accuracy": acc,
            "num_samples": 8, "sample_steps": 1, "mask_steps": 0, "budget": {"seed": seed}}  # fmt: skip


def test_aggregate_mean_std_min_max():
    rows = [_row("2to4-magnitude", s, f) for s, f in enumerate((10.0, 12.0, 14.0))]
    (agg,) = qs.aggregate(rows)
    assert agg["n"] == 3 and agg["seeds"] == [0, 1, 2]
    assert agg["fid_mean"] == pytest.approx(12.0)
    assert agg["fid_std"] == pytest.approx(2.0)  # sample std of 10, 12, 14
    assert (agg["fid_min"], agg["fid_max"]) == (10.0, 14.0)
    assert agg["baseline"] is None and agg["beyond_spread"] is None


def test_spread_marking_against_the_baseline():
    rows = [_row("2to4-magnitude", s, f) for s, f in enumerate((100.0, 102.0, 104.0))]  # mean 102, std 2
    rows += [_row("2to4-maskllm", s, f) for s, f in enumerate((90.0, 91.0, 92.0))]  # 91, std 1: 11 > 3
    rows += [_row("2to4-maskpro", s, f) for s, f in enumerate((99.0, 100.0, 101.0))]  # 100, std 1: 2 < 3
    rows += [_row("channels-taylor", 0, 50.0), _row("channels-magnitude", 0, 60.0)]  # 1 seed: undecided
    rows += [_row("2to4-maskllm", 0, 40.0, steps=400)]  # no baseline at 400 steps
    agg = {(r["variant"], r["finetune_steps"]): r for r in qs.aggregate(rows)}
    assert agg["2to4-maskllm", 100]["fid_diff"] == pytest.approx(-11.0)
    assert agg["2to4-maskllm", 100]["beyond_spread"] is True
    assert agg["2to4-maskpro", 100]["beyond_spread"] is False
    assert agg["channels-taylor", 100]["baseline"] == "channels-magnitude"
    assert agg["channels-taylor", 100]["beyond_spread"] is None
    assert agg["2to4-maskllm", 400]["baseline"] is None
    assert qs.baseline_of("depth-tinyfusion") == "depth-every-k" and qs.baseline_of("dense") is None
    text = "\n".join(qs.table(list(agg.values())))
    assert "**yes**" in text and "-11.00 vs 2to4-magnitude" in text


def test_resume_skips_finished_runs(tmp_path):
    calls = []

    def runner(variant, budget, out, work):
        calls.append((variant, budget.seed, budget.steps))
        return {**_row(variant, budget.seed, 10.0 + budget.seed, budget.steps), "budget": {"seed": budget.seed}}

    rows = qs.run_all(["dense", "2to4-magnitude"], [0, 1], [3], Budget(), tmp_path, tmp_path / "work", runner)
    assert len(calls) == 4 and len(rows) == 4
    assert qs.run_path(tmp_path, "dense", 1, 3).is_file()

    def fail(*_):
        raise AssertionError("a finished run was run again")

    again = qs.run_all(["dense", "2to4-magnitude"], [0, 1], [3], Budget(), tmp_path, tmp_path / "work", fail)
    assert again == rows
    assert sorted(r["variant"] for r in qs.runs_on_disk(tmp_path)) == ["2to4-magnitude"] * 2 + ["dense"] * 2


def test_readme_block_regenerated(tmp_path):
    agg = qs.aggregate([_row("2to4-magnitude", s, 10.0 + s) for s in range(2)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{qs.BEGIN}\nold\n{qs.END}\nafter\n")
    section = qs.readme_section(agg, {"budget": {}})
    assert qs.update_readme(readme, section) is True
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "| 2to4-magnitude | 100 | 0.0002 | - | 2 | 8 x 1 | 10.50 ± 0.71 |" in text
    assert qs.update_readme(readme, section) is False  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="quality-seeds:begin"):
        qs.update_readme(readme, section)


def test_committed_results_match_the_readme():
    results = ROOT / "bench" / "results" / "quality-seeds" / "quality-seeds.json"
    if not results.is_file():
        pytest.skip("no committed quality-seeds results yet")
    data = json.loads(results.read_text())
    rows = data["rows"]
    assert all(math.isfinite(r["fid_mean"]) and r["n"] >= 1 for r in rows)
    readme = (ROOT / "README.md").read_text()
    regenerate = "python -m bench.quality_seeds --aggregate-only --readme README.md"
    assert qs.readme_section(rows, data["environment"]) in readme, f"run `{regenerate}` to regenerate the README block"


def test_regress_guards_quality_by_the_seed_spread(tmp_path, capsys):
    from prunedm.bench.regress import main as regress_main

    def write(name, rows):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"environment": {"device": "cpu"}, "rows": qs.aggregate(rows)}))
        return str(path)

    base = write("base", [_row("2to4-maskllm", s, 100.0 + s) for s in range(3)])  # mean 101, std 1
    close = write("close", [_row("2to4-maskllm", s, 102.0 + s) for s in range(3)])  # +1 <= 2: ok
    worse = write("worse", [_row("2to4-maskllm", s, 104.0 + s) for s in range(3)])  # +3 > 2: regression
    assert regress_main(["--baseline", base, "--current", close]) == 0
    assert regress_main(["--baseline", base, "--current", worse]) == 1
    assert "REGRESSION (beyond the seed spread)" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "variant", ["dit-dense", "depth-every-k", "depth-block-influence", "depth-tinyfusion", "depth-tinyfusion-short"]
)
def test_dit_variants_have_the_expected_depth(variant):
    from prunedm.bench import quality_dit

    model = quality_dit.build_dit(num_layers=4, num_attention_heads=2, attention_head_dim=8)
    data = quality_dit.digits_data()
    data = type(data)(data.images[:16], data.key, data.table, data.ids[:16])
    budget = Budget(batch_size=4, mask_steps=2, seed=1)
    pruned = quality_dit.build_variant(variant, data, budget, model=model)
    depth = 4 if variant == "dit-dense" else 2
    assert len(pruned.transformer_blocks) == depth and pruned.config.num_layers == depth
    if variant == "depth-every-k":
        assert quality_dit.depth_keep(variant, quality_dit.build_dit(num_layers=4), data, budget) == [0, 2]
    out = pruned(data.images[:2], timestep=torch.tensor([3, 500]), class_labels=data.ids[:2]).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dit_runner_end_to_end(tmp_path, monkeypatch):
    from prunedm.bench import quality_dit

    monkeypatch.setattr(quality_dit, "load_dit", lambda: quality_dit.build_dit(num_layers=2, attention_head_dim=4))
    data = quality_dit.digits_data()
    small = type(data)(data.images[:32], data.key, data.table, data.ids[:32])
    monkeypatch.setattr(quality_dit, "_DATA", {"train": small, "reference": data.images[:40]})
    budget = Budget(steps=1, batch_size=4, mask_steps=1, samples=12, sample_steps=1, seed=0)
    row = quality_dit.run("depth-every-k", budget, tmp_path / "out", tmp_path / "work")
    assert row["depth"] == 1 and row["num_samples"] == 12 and math.isfinite(row["fid"])
    assert json.loads((tmp_path / "out" / "variants" / "depth-every-k.json").read_text())["depth"] == 1


def test_targets_are_reported_as_measured():
    rows = [_row("2to4-magnitude", s, f) for s, f in enumerate((100.0, 102.0, 104.0))]
    rows += [_row("2to4-maskllm", s, f) for s, f in enumerate((90.0, 91.0, 92.0))]
    text = qs.targets(qs.aggregate(rows))
    assert "100 steps: met (best 2to4-maskllm, FID -11.00 vs magnitude)" in text
    assert "400 steps: not measured" in text
    worse = [_row("2to4-magnitude", s, 100.0 + s) for s in range(2)] + [
        _row("2to4-maskpro", s, 120.0) for s in range(2)
    ]
    assert "100 steps: missed" in qs.targets(qs.aggregate(worse))
    kd = [_row("2to4-magnitude-kd", s, 50.0) for s in range(2)]  # a better finetune, not a learned mask
    assert "100 steps: missed (best 2to4-maskpro," in qs.targets(qs.aggregate(worse + kd))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_budgets_share_one_build_and_the_longer_finetune_continues_the_shorter(tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    from prunedm import load_pretrained
    from prunedm.bench import quality

    def tiny_digits_unet():  # one channel, as the digits
        torch.manual_seed(0)
        blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                           block_out_channels=(16, 32), norm_num_groups=4, **blocks)  # fmt: skip

    monkeypatch.setattr(quality, "load_dense", tiny_digits_unet)
    builds = []
    original = quality.build_variant

    def counting(name, images, budget, progress):
        builds.append((name, budget.steps))
        return original(name, images, budget, progress)

    monkeypatch.setattr(quality, "build_variant", counting)
    base = Budget(batch_size=4, samples=8, sample_steps=1, reference=40)
    rows = qs.run_all(["2to4-magnitude"], [0], [1, 0], base, tmp_path / "out", tmp_path / "work")
    assert [r["finetune_steps"] for r in rows] == [0, 1]  # ascending, whatever order was given
    rows += qs.run_all(["2to4-magnitude"], [0], [2], base, tmp_path / "out", tmp_path / "work")  # a later invocation
    assert builds == [("2to4-magnitude", 0)]  # budgets 1 and 2 load the model built for budget 0
    assert rows[0]["final_loss"] is None and math.isfinite(rows[0]["fid"])
    history = (tmp_path / "work" / "steps-2" / "seed-0" / "2to4-magnitude" / "finetune" / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in history.splitlines()] == [1, 2]  # step 1 came from the 1-step run

    # The same 2-step run from scratch, in a fresh work dir: bit-identical weights.
    rows = qs.run_all(["2to4-magnitude"], [0], [2], base, tmp_path / "out2", tmp_path / "work2")
    continued, scratch = (
        load_pretrained(tmp_path / w / "steps-2" / "seed-0" / "2to4-magnitude" / "model") for w in ("work", "work2")
    )
    for (name, a), b in zip(continued.state_dict().items(), scratch.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kd_variant_shares_the_build_and_finetunes_with_the_dense_teacher(tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    from prunedm.bench import quality
    from prunedm.train import distill

    def tiny_digits_unet():
        torch.manual_seed(0)
        blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                           block_out_channels=(16, 32), norm_num_groups=4, **blocks)  # fmt: skip

    monkeypatch.setattr(quality, "load_dense", tiny_digits_unet)
    monkeypatch.setattr(quality, "DESCRIPTIONS", {**quality.DESCRIPTIONS, "2to4-magnitude-kd": "kd"})
    teachers = []
    original_loss = distill.DistillLoss.__init__
    monkeypatch.setattr(
        distill.DistillLoss, "__init__", lambda self, c, m: teachers.append(c) or original_loss(self, c, m)
    )
    base = Budget(batch_size=4, samples=8, sample_steps=1, reference=40)
    rows = qs.run_all(["2to4-magnitude", "2to4-magnitude-kd"], [0], [1], base, tmp_path / "out", tmp_path / "work")
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "work" / "built" / "seed-0").iterdir()] == ["2to4-magnitude"]
    assert len(teachers) == 1 and teachers[0].kd_weight == 0.9  # only the -kd run distils
    assert rows[0]["final_loss"] != rows[1]["final_loss"] and rows[1]["mask_steps"] == 0


def test_runs_of_another_finetune_lr_are_kept_and_compared_apart(tmp_path):
    def at(lr, row):
        return {**row, "budget": {**row["budget"], "lr": lr}}

    rows = [at(2e-4, _row("2to4-magnitude", s, 30.0 + s)) for s in range(3)]
    rows += [at(2e-4, _row("2to4-maskllm", s, 31.0 + s)) for s in range(3)]
    rows += [at(5e-5, _row("2to4-magnitude", s, 70.0 + s)) for s in range(3)]
    rows += [at(5e-5, _row("2to4-maskllm", s, 32.0 + s)) for s in range(3)]
    rows += [at(5e-5, _row("2to4-maskllm", s, 60.0 + s, steps=0)) for s in range(2)]  # no lr at 0 steps
    agg = {(r["variant"], r["finetune_steps"], r["finetune_lr"]): r for r in qs.aggregate(rows)}
    assert set(agg) == {("2to4-magnitude", 100, 2e-4), ("2to4-maskllm", 100, 2e-4), ("2to4-magnitude", 100, 5e-5),
                        ("2to4-maskllm", 100, 5e-5), ("2to4-maskllm", 0, None)}  # fmt: skip
    assert agg["2to4-maskllm", 100, 5e-5]["fid_diff"] == pytest.approx(-38.0)  # against magnitude at its own lr
    assert agg["2to4-maskllm", 100, 2e-4]["fid_diff"] == pytest.approx(1.0)
    text = qs.targets(list(agg.values()))
    assert "Issue 15 targets: learned 2:4 beats magnitude 2:4 beyond the seed spread at 100 steps: missed" in text
    assert "At finetune lr 5e-05 (the same protocol otherwise): learned 2:4 beats magnitude 2:4 beyond the seed " \
           "spread at 100 steps: met (best 2to4-maskllm, FID -38.00 vs magnitude)" in text  # fmt: skip
    assert qs.run_path(tmp_path, "dense", 0, 100) != qs.run_path(tmp_path, "dense", 0, 100, 5e-5)
    assert "lr-5e-05" in str(qs.run_path(tmp_path, "dense", 0, 100, 5e-5))


def test_targets_report_masks_on_frozen_weights_and_the_dense_reference():
    rows = [_row("2to4-magnitude", s, 300.0 + s, steps=0) for s in range(3)]
    rows += [_row("2to4-maskllm-short", s, 60.0 + s, steps=0) for s in range(3)]
    rows += [_row("dense", s, 10.0 + s, steps=400) for s in range(3)]
    rows += [_row("2to4-magnitude", s, 10.5 + s, steps=400) for s in range(3)]
    text = qs.targets(qs.aggregate(rows))
    assert "0 finetune steps, MaskLLM's and MaskPro's own protocol): met (best 2to4-maskllm-short, FID -240.00" in text
    assert "within 10% of dense FID (11.00) at 400 steps: missed (within: 2to4-magnitude)" in text


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dit_budgets_share_one_build_and_continue(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from prunedm.bench import quality_dit

    monkeypatch.setattr(quality_dit, "load_dit", lambda: quality_dit.build_dit(num_layers=2, attention_head_dim=4))
    monkeypatch.setattr(quality_dit, "DIT_DIR", tmp_path)  # "shipped": run_all checks for its config
    (tmp_path / "config.json").write_text("{}")
    data = quality_dit.digits_data()
    small = type(data)(data.images[:32], data.key, data.table, data.ids[:32])
    monkeypatch.setattr(quality_dit, "_DATA", {"train": small, "reference": data.images[:40]})
    builds = []
    original = quality_dit.build_variant
    monkeypatch.setattr(quality_dit, "build_variant", lambda *a, **k: builds.append(a[0]) or original(*a, **k))
    base = Budget(batch_size=4, samples=12, sample_steps=1)
    qs.run_all(["depth-every-k"], [0], [2, 1], base, tmp_path / "out", tmp_path / "work")
    assert builds == ["depth-every-k"]
    qs.run_all(["depth-every-k"], [0], [2], base, tmp_path / "out2", tmp_path / "work2")
    ckpt = Path("steps-2", "seed-0", "depth-every-k", "finetune", "checkpoints", "step-00000002", "ema.safetensors")
    continued, scratch = (load_file(tmp_path / w / ckpt) for w in ("work", "work2"))
    assert continued.keys() == scratch.keys()
    for name, tensor in continued.items():
        assert torch.equal(tensor, scratch[name]), name
    history = (tmp_path / "work" / "steps-2" / "seed-0" / "depth-every-k" / "finetune" / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in history.splitlines()] == [1, 2]
