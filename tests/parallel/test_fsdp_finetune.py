"""finetune under FSDP2 (parallel: fsdp) on 2 gloo processes (CPU): a tiny attention UNet with 2:4 masks
(keep_sparsity) sharded per block, AdamW, clipping and the EMA on each rank's rows. Its weights match one
process on the joined batch, the masks hold exactly, and a run stopped mid-way resumes in one process from
its sharded checkpoint with the uninterrupted run's result."""

from __future__ import annotations

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


def _run(out, **overrides):
    from prunedm.parallel.finetune import finetune_sharded

    model = _masked_unet()
    result = finetune_sharded(model, _images(), out, _config(**overrides), resume=True)
    return {k: v.detach().clone() for k, v in result.ema_model.state_dict().items()}


def _two_ranks(rank: int, out: str) -> dict[str, torch.Tensor]:
    return _run(f"{out}/run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank run (spawning costs seconds) and one uninterrupted single-process run of the same config."""
    out = tmp_path_factory.mktemp("fsdp-finetune")
    spawn_ranks(WORLD, out, _two_ranks, "ema.safetensors")
    return out, load_file(out / "ema.safetensors"), _run(out / "single")


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
    out, sharded, single = runs
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
    out, sharded, single = runs
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


def test_refusals(tmp_path):
    from prunedm.parallel.finetune import finetune_sharded
    from prunedm.train import DistillConfig, finetune

    with pytest.raises(ValueError, match="masked KD .distill. under parallel 'fsdp' is not supported"):
        finetune_sharded(_masked_unet(), _images(), tmp_path / "kd", _config(), distill=DistillConfig(_masked_unet()))
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
