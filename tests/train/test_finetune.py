"""Finetuning: the loop, checkpoints, exact resume after a killed run, DDP on gloo, distillation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import DiTTransformer2DModel, UNet2DModel

from prunedm.train import DistillConfig, FinetuneConfig, finetune, masked_mse
from prunedm.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip


def tiny_images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def quiet(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"steps": 4, "batch_size": 4, "lr": 1e-3, "progress": False, "log_every": 1, **overrides})


def test_finetune_writes_metrics_checkpoints_and_ema(tmp_path):
    model = tiny_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, tiny_images(), tmp_path, quiet(checkpoint_every=2, ema_decay=0.5))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["lr"] == 1e-3 for r in records)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    ema = result.ema_model.state_dict()
    assert not torch.equal(ema["conv_in.weight"], model.state_dict()["conv_in.weight"])
    assert result.final_loss == records[-1]["loss"]


def test_resuming_a_finished_run_reports_its_last_loss(tmp_path):
    first = finetune(tiny_unet(), tiny_images(), tmp_path, quiet(checkpoint_every=2))
    again = finetune(tiny_unet(), tiny_images(), tmp_path, quiet(checkpoint_every=2), resume=True)
    assert again.final_loss == first.final_loss and again.final_loss > 0
    assert torch.equal(again.ema_model.state_dict()["conv_in.weight"], first.ema_model.state_dict()["conv_in.weight"])


_KILLED_RUN = """
import os, signal, sys, torch
torch.set_num_threads({threads})  # the parent's: float reductions depend on the thread count
sys.path.insert(0, {tests!r})
from test_finetune import tiny_unet, tiny_images, quiet
from prunedm.train import finetune

def die_after_six(step, metrics):
    if step == 6:  # checkpoint 4 is on disk, steps 5 and 6 are not
        os.kill(os.getpid(), signal.SIGKILL)

finetune(tiny_unet(), tiny_images(), {out!r}, quiet(steps=8, checkpoint_every=4), callback=die_after_six)
"""


def test_resume_after_a_killed_run_continues_exactly(tmp_path):
    straight = tiny_unet()
    finetune(straight, tiny_images(), tmp_path / "straight", quiet(steps=8, checkpoint_every=4))

    out = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(out), threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(out / "checkpoints").name == "step-00000004"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]

    resumed = tiny_unet(seed=123)  # different init: everything must come from the checkpoint
    result = finetune(resumed, tiny_images(), out, quiet(steps=8, checkpoint_every=4), resume=True)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert [r["step"] for r in result.history] == list(range(1, 9))


def test_resume_without_checkpoint_starts_afresh_and_bad_pointer_is_clear(tmp_path):
    finetune(tiny_unet(), tiny_images(), tmp_path, quiet(steps=1), resume=True)
    (tmp_path / "checkpoints" / "latest").write_text("not json")
    with pytest.raises(ValueError, match="not a prunedm checkpoint pointer"):
        finetune(tiny_unet(), tiny_images(), tmp_path, quiet(steps=2), resume=True)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        finetune(tiny_unet(), tiny_images(), tmp_path, quiet(mixed_precision="fp8"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(tiny_unet(), tiny_images(2), tmp_path, quiet())


def test_dit_with_class_labels_and_bf16_autocast(tmp_path):
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [{"images": torch.randn(4, 8, 8, generator=g), "class_labels": torch.tensor(i % 10)} for i in range(8)]
    result = finetune(dit, data, tmp_path, quiet(steps=2, mixed_precision="bf16"))
    assert torch.isfinite(torch.tensor(result.final_loss))


def test_masked_mse_ignores_outliers():
    teacher = torch.zeros(1, 100)
    teacher[0, 0] = 100.0  # a massive activation, far outside mean +/- 2 sigma
    student = torch.ones(1, 100)
    assert masked_mse(student, teacher, sigma=2.0) == pytest.approx(1.0)
    assert masked_mse(student, teacher, sigma=None) == pytest.approx((99 + 99**2) / 100)


def test_distillation_from_teacher_with_features(tmp_path):
    teacher = tiny_unet(seed=5)
    student = tiny_unet(seed=6)
    distill = DistillConfig(teacher, feature_weight=0.5, feature_layers={"mid_block": "mid_block"})
    result = finetune(student, tiny_images(), tmp_path, quiet(steps=3), distill=distill)
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="feature_layers names modules the model does not have"):
        finetune(
            tiny_unet(),
            tiny_images(),
            tmp_path / "x",
            quiet(),
            distill=DistillConfig(teacher, feature_layers={"nope": "mid_block"}),
        )


def test_distillation_resume_continues_the_feature_decay_exactly(tmp_path):
    """beta's decay is keyed by the training step, so a resumed distillation equals the straight run."""

    def run(out, steps):
        torch.manual_seed(0)
        distill = DistillConfig(
            tiny_unet(seed=5), feature_weight=0.5, feature_layers={"mid_block": "mid_block"}, feature_decay_steps=4
        )
        student = tiny_unet(seed=6)
        finetune(student, tiny_images(), out, quiet(steps=steps, checkpoint_every=2), distill=distill)
        return student

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _ddp_worker(rank: int, world: int, init_file: str, out: str, results: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_unet()
    finetune(model, tiny_images(), out, quiet(steps=3, checkpoint_every=3))
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(results, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_keeps_ranks_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    fresh = tiny_unet().state_dict()
    assert any(not torch.equal(rank0[k], fresh[k]) for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000003"
