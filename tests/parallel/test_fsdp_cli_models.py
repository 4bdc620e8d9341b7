"""The CLI as torchrun runs it (2 gloo ranks, env://) with parallel=fsdp on a tiny Flux pipeline (CLIP + T5
prompts) and a tiny SDXL one (tests/cli/test_conditioning_sdxl: a text_time UNet2DConditionModel in SDXL's layout,
conditioned on two CLIP encoders' embeddings, pooled text embeds and time ids): learn-mask (MaskLLM on Flux,
MaskPro on the UNet), finetune and a masked-KD finetune, in one spawn. Each writes exact 2:4 masks or a finite
loss; a batch the ranks cannot split evenly is refused."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from prunedm.cli import main
from tests.cli.test_conditioning import sd_pipeline  # noqa: F401 (fixture)
from tests.cli.test_conditioning_mmdit import captioned, flux_pipeline  # noqa: F401 (fixtures)
from tests.cli.test_conditioning_sdxl import sdxl_pipeline  # noqa: F401 (fixture)
from tests.parallel.gloo_ranks import start_ranks

diffusers = pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.slow,  # 2 forked ranks, 6 CLI jobs on a Flux and an SDXL pipeline: ~50 s on 2 loaded cores
]

WORLD = 2


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _worker(rank: int, jobs: list[list[str]], ports: list[int]) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    for argv, port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)
        expected = 2 if "batch_size=3" in argv else 0
        if main(argv) != expected:
            raise AssertionError(f"rank {rank}: prunedm {' '.join(argv)} did not exit with {expected}")


def _check_masks(out, world: int = WORLD):
    assert json.loads((out / "learner-sharded" / "prunedm.json").read_text())["world_size"] == world
    masks = load_file(str(out / "masks.safetensors"))
    assert masks
    for name, mask in masks.items():
        groups = (mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask).reshape(-1, 4)
        assert bool((groups.sum(-1) == 2).all()), name


@pytest.mark.skipif(sys.platform == "win32", reason="gloo on loopback")
def test_learn_mask_and_finetune_fsdp_on_tiny_flux_and_sdxl(
    flux_pipeline,  # noqa: F811
    sdxl_pipeline,  # noqa: F811
    captioned,  # noqa: F811
    tmp_path,
):
    common = [f"data={captioned}", "parallel=fsdp", "device=cpu"]
    learn = ["learn-mask", *common, "steps=2", "batch_size=2", "checkpoint_every=1"]
    tune = ["finetune", *common, "finetune.steps=2", "finetune.batch_size=2", "finetune.progress=false",
            "finetune.log_every=1"]  # fmt: skip
    outs = {name: tmp_path / name for name in ("flux-lm", "flux-ft", "flux-kd", "sdxl-lm", "sdxl-ft")}
    jobs = [  # fmt: skip
        [*learn, f"model={flux_pipeline}", "method=maskllm", "maskllm.preset=short", "--out", str(outs["flux-lm"])],
        [*tune, f"model={flux_pipeline}", "--out", str(outs["flux-ft"])],
        [*tune, f"model={flux_pipeline}", f"distill.teacher={flux_pipeline}", "--out", str(outs["flux-kd"])],
        [
            *learn,
            f"model={sdxl_pipeline}",
            "method=maskpro",
            "maskpro.preset=short",
            "--out",
            str(outs["sdxl-lm"]),
        ],
        [*tune, f"model={sdxl_pipeline}", "--out", str(outs["sdxl-ft"])],
    ]
    odd = [*learn, f"model={flux_pipeline}", "batch_size=3", "--out", str(tmp_path / "odd")]  # refused: exit 2
    jobs.append(odd)
    start_ranks(_worker, (jobs, _free_ports(len(jobs))), WORLD)
    assert not (tmp_path / "odd").exists()
    for name in ("flux-lm", "sdxl-lm"):
        _check_masks(outs[name])
    assert "maskpro" in json.loads((outs["sdxl-lm"] / "report.json").read_text())
    for name in ("flux-ft", "sdxl-ft"):
        report = json.loads((outs[name] / "report.json").read_text())
        assert torch.isfinite(torch.tensor(report["final_loss"])), name
    # Masked KD with the teacher sharded like the student: taught by itself, the first step's KD and feature terms
    # are 0, so its loss is gt_weight (0.1) x the plain finetune's on the same noise.
    first = [json.loads((outs[n] / "metrics.jsonl").read_text().splitlines()[0]) for n in ("flux-ft", "flux-kd")]
    assert first[0]["step"] == first[1]["step"] == 1
    assert first[1]["loss"] == pytest.approx(0.1 * first[0]["loss"], rel=1e-4)
    assert json.loads((outs["flux-kd"] / "report.json").read_text())["distill"]["feature_pairs"] == 1
