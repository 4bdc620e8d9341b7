"""Masked KD through `prunedm finetune distill.teacher=...`: the shipped digits DiT depth-pruned and distilled from
its original (teacher=original: the prune job's model and kept blocks) ends where prunedm.train.finetune with the
same DistillConfig ends; the digits DDPM taught by itself starts at gt_weight x the plain loss (the KD term is 0);
report.json records the settings; a teacher that does not fit the student is refused before --out."""

from __future__ import annotations

import json

import pytest
import torch

from prunedm.cli import main
from prunedm.cli.models import ASSETS

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread_module")]

DIT = ASSETS / "digits-dit"
TUNE = ["finetune.steps=2", "finetune.batch_size=4", "finetune.log_every=1", "finetune.progress=false", "device=cpu"]


def _finetune(out, *args):
    return main(["finetune", *map(str, args), *TUNE, "--out", str(out)])


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pruned_dit(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "p"
    assert main(["prune", f"model={DIT}", "method=depth", "depth.every=2", "device=cpu", "--out", str(out)]) == 0
    return out


def test_depth_pruned_dit_distilled_from_its_original_as_the_library_does(pruned_dit, tmp_path):
    from prunedm import load_pretrained
    from prunedm.cli.models import load_model
    from prunedm.cli.pipeline import conditioned_data, training_scheduler
    from prunedm.train import FinetuneConfig, finetune
    from prunedm.train.distill import DistillConfig

    kept = json.loads((pruned_dit / "report.json").read_text())["kept_blocks"]
    assert kept == [0, 2, 4, 6]
    args = [f"model={pruned_dit / 'model'}", "data=digits", "distill.teacher=original", "distill.feature_weight=0.5",
            "distill.output_mask_sigma=3"]  # fmt: skip
    assert _finetune(tmp_path / "cli", *args) == 0
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["distill"] == {"teacher": str(DIT), "kd_weight": 0.9, "gt_weight": 0.1, "feature_weight": 0.5,
                                 "feature_decay_steps": None, "mask_sigma": 2.0, "output_mask_sigma": 3.0,
                                 "keep_indices": kept, "feature_pairs": 4}  # fmt: skip

    student = load_pretrained(pruned_dit / "model")
    config = {"model": str(pruned_dit / "model"), "pipeline": None, "data": "digits", "cond_dropout": 0.0}
    _, data = conditioned_data(config, student, torch.device("cpu"))
    settings = DistillConfig(teacher=load_model(str(DIT)), feature_weight=0.5, output_mask_sigma=3.0, keep_indices=kept)
    steps = FinetuneConfig(steps=2, batch_size=4, log_every=1, progress=False)
    result = finetune(student, data, tmp_path / "lib", steps, training_scheduler(config, student), distill=settings)
    assert _losses(tmp_path / "cli") == _losses(tmp_path / "lib") and len(_losses(tmp_path / "lib")) == 2
    cli = load_pretrained(tmp_path / "cli" / "model").state_dict()
    for name, value in result.ema_model.state_dict().items():
        assert torch.equal(cli[name], value), name


def test_digits_ddpm_taught_by_itself_starts_at_gt_weight_times_the_plain_loss(tmp_path):
    model = "model=asset:digits-ddpm"
    assert _finetune(tmp_path / "plain", model) == 0
    assert _finetune(tmp_path / "kd", model, "distill.teacher=asset:digits-ddpm", "distill.gt_weight=0.25") == 0
    plain, kd = _losses(tmp_path / "plain"), _losses(tmp_path / "kd")
    assert kd[0] == pytest.approx(0.25 * plain[0], rel=1e-5)  # the same noise; student = teacher at step 0
    report = json.loads((tmp_path / "kd" / "report.json").read_text())["distill"]
    assert report["teacher"] == "asset:digits-ddpm" and report["feature_pairs"] == 0  # a UNet: no blocks to match
    assert "distill" not in json.loads((tmp_path / "plain" / "report.json").read_text())


def test_teachers_that_do_not_fit_are_refused_before_out(pruned_dit, tmp_path, capsys):
    import diffusers

    student = f"model={pruned_dit / 'model'}"
    narrow = tmp_path / "narrow"  # 4 blocks of half the width: the blocks map 1:1 but their outputs differ
    config = {k: v for k, v in diffusers.DiTTransformer2DModel.load_config(DIT).items() if not k.startswith("_")}
    diffusers.DiTTransformer2DModel(**{**config, "num_layers": 4, "num_attention_heads": 2}).save_pretrained(narrow)
    cases = [
        (
            (student, f"distill.teacher={DIT}"),
            "keep_indices is needed: the student has 4 blocks, the teacher 8",
        ),
        ((student, f"distill.teacher={DIT}", "distill.keep_indices=[0, 2, 4, 9]"), "name 4 teacher blocks in [0, 8)"),
        ((student, "distill.teacher=asset:digits-ddpm"), "a UNet2DModel cannot teach the DiTTransformer2DModel"),
        ((f"model={DIT}", "distill.teacher=original"), "is not the model/ of a prunedm job"),
        ((student, "distill.teacher=original", "cond_dropout=0.1"), "the teacher would see the captions or classes"),
        ((student, "distill.teacher=original", "distill.mask_sigma=0"), "distill.mask_sigma must be a number > 0"),
        (
            (student, f"distill.teacher={narrow}"),
            "transformer_blocks.3 [1, 64, 32] != student",
        ),
    ]
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert _finetune(out, *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
        assert not out.exists(), args
