"""`prunedm learn-mask parallel=fsdp` as torchrun runs it (2 gloo ranks, the env:// variables torchrun sets) on the
tiny UNet, in mixed precision (mixed_precision=bf16): it writes 2:4 masks and a sharded checkpoint that one process
resumes from and continues, and the masked model in fp32; the parallel key takes ddp or fsdp only, fsdp and bf16 only
with a frozen model, bf16 only for a learner."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from prunedm.cli import main
from tests.parallel.gloo_ranks import start_ranks

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo on loopback"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

WORLD = 2
ARGS = ["learn-mask", "model=arch:tiny-unet", "method=maskllm", "parallel=fsdp", "batch_size=4", "checkpoint_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Killed(BaseException):
    """Stands for a kill right after a checkpoint."""


def _torchrun_worker(rank: int, port: int, argv: list[str]) -> None:
    from prunedm.parallel import checkpoint

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    save = checkpoint.save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise _Killed

    checkpoint.save = save_then_die
    try:
        main(argv)
    except _Killed:
        return
    raise AssertionError("the run was not stopped at its first checkpoint")


@pytest.mark.slow  # two forked ranks, then a third run in this process: ~25 s on 2 loaded cores
def test_learn_mask_fsdp_two_ranks_then_resume_in_one_process(tmp_path):
    from prunedm import load_pretrained, ops

    out = tmp_path / "out"
    argv = [*ARGS, "mixed_precision=bf16", "steps=2", "device=cpu", "--out", str(out)]
    start_ranks(_torchrun_worker, (_free_port(), argv), WORLD)  # killed after step 1
    meta = json.loads((out / "learner-sharded" / "prunedm.json").read_text())
    assert (meta["world_size"], meta["compute_dtype"]) == (WORLD, "bfloat16")
    assert not (out / "masks.safetensors").exists()
    # One process continues the 2-rank run from its sharded checkpoint.
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "learner-sharded" / "prunedm.json").read_text())["step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    masks = load_file(str(out / "masks.safetensors"))
    modules = dict(load_pretrained(out / "model").named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert weight.dtype == torch.float32, name  # a fresh fp32 copy masked, not the bf16 one
        matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1) if weight.dim() == 4 else weight
        assert ops.nm_violations(matrix, 2, 4) == 0, name
        assert int((mask != 0).sum()) == mask.numel() // 2, name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel=zero", "one of ddp, fsdp"),
        ("maskpro.model_lr=0.001", "maskpro.model_lr must be 0"),
        ("mixed_precision=fp16", "mixed_precision must be one of no, bf16"),
        ("mixed_precision=bf16 method=magnitude parallel=ddp", "bf16 applies to method maskllm or maskpro"),
        ("mixed_precision=bf16 maskpro.model_lr=0.001 parallel=ddp", "bf16 learns masks of a frozen model"),
    ],
)
def test_parallel_key_is_checked(tmp_path, capsys, override, message):
    argv = [
        *ARGS,
        "steps=1",
        "device=cpu",
        *(["method=maskpro"] if "maskpro" in override else []),
        *override.split(),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
