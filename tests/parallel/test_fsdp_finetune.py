"""finetune under FSDP2 (parallel: fsdp) on 2 gloo processes (CPU): a tiny attention UNet with 2:4 masks
(keep_sparsity) sharded per block, AdamW, clipping and the EMA on each rank's rows, without and with masked KD
from the dense UNet (teacher sharded too). Its weights match one
process on the joined batch, the masks hold exactly, and a run stopped mid-way resumes in one process from
its sharded checkpoint with the uninterrupted run's result."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tiny_models import tiny_pruning_unet

from tests.parallel.gloo_ranks import spawn_ranks

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
    pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

WORLD = 2
STEPS = 4
KD_STEPS = 2  # the KD runs: 2 steps (one checkpoint) keep the spawn short
LR = 1e-3


def _masked_unet():
    from prunedm import masks as pm

    model = tiny_pruning_unet()
    targets, _ = pm.find_targets(model)
    masks = pm.magnitude_masks(targets)
    pm.apply_masks(model, masks)
    return model


def _images() -> torch.Tensor:
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def _config(**overrides):
    from prunedm.train import FinetuneConfig

    settings = {"steps": STEPS, "batch_size": 4, "lr": LR, "progress": False, "log_every": 1, "checkpoint_every": 2,
                "keep_sparsity": True, "grad_clip": 0.05, **overrides}  # fmt: skip
    return FinetuneConfig(**settings)


def _kd():
    """Masked KD from the dense UNet: output KD masked at 2 sigma (the count-divided term), features of the
    attention down block and the mid block at beta 0.1."""
    from prunedm.train import DistillConfig

    pairs = {"down_blocks.1": "down_blocks.1", "mid_block": "mid_block"}
    return DistillConfig(tiny_pruning_unet(), feature_layers=pairs, feature_weight=0.1, output_mask_sigma=2.0)


def _run(out, distill=None, **overrides):
    from prunedm.parallel.finetune import finetune_sharded

    model = _masked_unet()
    result = finetune_sharded(model, _images(), out, _config(**overrides), resume=True, distill=distill)
    return {k: v.detach().clone() for k, v in result.ema_model.state_dict().items()}


def _two_ranks(rank: int, out: str) -> dict[str, torch.Tensor]:
    kd = {f"kd.{k}": v for k, v in _run(f"{out}/kd", distill=_kd(), steps=KD_STEPS).items()}
    bf16 = {f"bf16.{k}": v for k, v in _run(f"{out}/bf16", steps=KD_STEPS, mixed_precision="bf16").items()}
    return {**_run(f"{out}/run"), **kd, **bf16}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank spawn (spawning costs seconds) running the plain and the masked-KD config, and one
    uninterrupted single-process run of each; the KD results are under "kd.", a bf16 2-rank run's under "bf16."."""
    out = tmp_path_factory.mktemp("fsdp-finetune")
    spawn_ranks(WORLD, out, _two_ranks, "ema.safetensors")
    both = load_file(out / "ema.safetensors")
    sharded = {k: v for k, v in both.items() if not k.startswith(("kd.", "bf16."))}
    single_kd = {f"kd.{k}": v for k, v in _run(out / "single-kd", distill=_kd(), steps=KD_STEPS).items()}
    return out, sharded, _run(out / "single"), both, single_kd


def _checkpoint_weights(path) -> dict[str, torch.Tensor]:
    from prunedm.parallel import checkpoint as sharded

    model = _masked_unet()
    tensors = {f"model.{k}": torch.empty_like(v) for k, v in model.named_parameters()}
    sharded.load(path, tensors)
    return {k.removeprefix("model."): v for k, v in tensors.items()}


def _assert_close(actual: dict, expected: dict) -> None:
    # The 2-rank run averages two half-batch gradients where one process takes one mean, and sums the clipping
    # norm in another order: float rounding, ~1e-7 relative. Adam's m / sqrt(v) turns the rounding of a near-zero
    # gradient into up to a full +-lr step, so a weight may differ by up to lr per step; the EMA averages weights.
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=2 * LR * STEPS, msg=name)
    deltas = torch.cat([(actual[k] - v).abs().flatten() for k, v in expected.items()])
    assert float(deltas.median()) < 1e-5, "most weights should agree to float rounding"


def test_sharded_weights_close_to_one_process_and_masks_kept(runs):
    out, sharded, single = runs[:3]
    _assert_close(sharded, single)
    start = _masked_unet().state_dict()
    assert any(not torch.equal(sharded[k], start[k]) for k in start), "nothing trained: the comparison is vacuous"
    trained = _checkpoint_weights(out / "run" / "checkpoints" / f"step-{STEPS:08d}")
    masked = 0
    for name, weight in trained.items():
        if name.endswith(".weight") and weight.dim() > 1 and (start[name] == 0).any():
            masked += 1
            assert torch.equal(weight == 0, start[name] == 0), name
            assert torch.equal(sharded[name] == 0, start[name] == 0), name
    assert masked >= 5


def test_stopped_sharded_run_resumes_on_one_rank(runs, tmp_path):
    out, sharded, single = runs[:3]
    stopped = tmp_path / "stopped"
    shutil.copytree(out / "run", stopped)
    shutil.rmtree(stopped / "checkpoints" / f"step-{STEPS:08d}")  # killed before its last checkpoint
    (stopped / "checkpoints" / "latest").unlink()
    resumed = _run(stopped)
    _assert_close(resumed, sharded)
    _assert_close(resumed, single)
    # in one process, resuming the uninterrupted run from its mid-way checkpoint is bit-exact
    halves = tmp_path / "halves"
    shutil.copytree(out / "single", halves)
    shutil.rmtree(halves / "checkpoints" / f"step-{STEPS:08d}")
    for name, value in _run(halves).items():
        assert torch.equal(value, single[name]), name


def test_masked_kd_sharded_close_to_one_process(runs):
    out, plain, both, single_kd = runs[0], runs[1], runs[3], runs[4]
    losses = [[json.loads(line)["loss"] for line in (out / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("kd", "single-kd")]  # fmt: skip
    # the ranks' mean loss is the joined batch's (the count-divided output term included): step 1 before any
    # update agrees to float rounding
    assert len(losses[0]) == KD_STEPS and losses[0][0] == pytest.approx(losses[1][0], rel=1e-6, abs=0)
    sharded_kd = {k: v for k, v in both.items() if k.startswith("kd.")}
    _assert_close(sharded_kd, single_kd)  # the tolerance and reasons of the runs without KD (2 steps fewer)
    differs = [k for k in plain if not torch.equal(sharded_kd[f"kd.{k}"], plain[k])]
    assert differs, "the KD loss changed nothing: the comparison is vacuous"
    for name, value in plain.items():  # keep_sparsity holds under KD too
        if name.endswith(".weight") and value.dim() > 1 and (value == 0).any():
            assert torch.equal(sharded_kd[f"kd.{name}"] == 0, value == 0), name


def test_bf16_mixed_precision_policy_close_to_fp32(runs):
    """mixed_precision bf16 under FSDP2 (bf16 compute, fp32 master weights and reduction): the losses of its 2
    steps within 2% of the fp32 run's (bf16 keeps 8 mantissa bits: ~0.4% per rounding), fp32 weights near fp32's."""
    out, plain, both = runs[0], runs[1], runs[3]
    losses = {run: [json.loads(line)["loss"] for line in (out / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("bf16", "run")}  # fmt: skip
    assert len(losses["bf16"]) == KD_STEPS
    assert losses["bf16"] == pytest.approx(losses["run"][:KD_STEPS], rel=2e-2)
    assert losses["bf16"] != losses["run"][:KD_STEPS], "bf16 changed nothing: the policy was not applied"
    for name, value in plain.items():
        weight = both[f"bf16.{name}"]
        assert weight.dtype == value.dtype and bool(torch.isfinite(weight).all()), name
        torch.testing.assert_close(weight, value, rtol=0, atol=2 * LR * STEPS, msg=name)


def test_masked_output_kd_divides_by_the_joined_count():
    """What the sharded KD gives each rank's masked output term: the ranks' mean is the joined batch's value
    even where the halves keep different numbers of elements (the halves' own counts would not give it)."""
    from prunedm.train.distill import masked_mse, within_sigma

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    teacher[0::2, :, :2] *= 8  # outliers in rank 0's items only: its half keeps fewer elements
    joined = masked_mse(student, teacher, 2.0)
    kept = within_sigma(teacher, 2.0).sum().float()
    halves = [(student[r::WORLD], teacher[r::WORLD]) for r in range(WORLD)]
    sharded = sum(masked_mse(s, t, 2.0, lambda k: kept / WORLD) for s, t in halves) / WORLD
    own = sum(masked_mse(s, t, 2.0) for s, t in halves) / WORLD
    torch.testing.assert_close(sharded, joined, rtol=1e-6, atol=0)
    assert abs(float(own / joined) - 1) > 1e-3


def test_refusals(tmp_path):
    from prunedm.parallel.finetune import finetune_sharded
    from prunedm.train import finetune

    with pytest.raises(ValueError, match="mixed_precision 'fp16' under parallel 'fsdp'"):
        finetune_sharded(_masked_unet(), _images(), tmp_path / "fp16", _config(mixed_precision="fp16"))
    finetune(_masked_unet(), _images(), tmp_path / "ddp", _config(steps=1))  # the DDP path's checkpoints
    with pytest.raises(ValueError, match="cannot resume under parallel 'fsdp'.*not a prunedm sharded checkpoint"):
        finetune_sharded(_masked_unet(), _images(), tmp_path / "ddp", _config(), resume=True)


def test_cli_finetune_parallel_fsdp(tmp_path, capsys):
    from prunedm import load_pretrained
    from prunedm.cli import main

    args = ["finetune", "model=arch:tiny-unet", "device=cpu", "finetune.steps=1", "finetune.batch_size=4",
            "finetune.progress=false"]  # fmt: skip
    assert main([*args, "parallel=zero", "--out", str(tmp_path / "bad")]) == 2
    assert "parallel must be one of ddp, fsdp" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main([*args, "parallel=fsdp", "--out", str(out)]) == 0
    assert (out / "checkpoints" / "step-00000001" / "prunedm.json").exists()
    model = load_pretrained(out / "model")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
