"""Kill-and-resume for every resumable job: a run stopped at any step (cleanly, by kill -9, or mid-write,
leaving temporaries) and resumed ends bit-identical to the uninterrupted run, with no temporaries left."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from prunedm import masks as pm
from prunedm._atomic import TEMP_MARK
from prunedm.cli import main
from prunedm.structural import StructuralGateLearner, denoiser_output

pytestmark = [pytest.mark.usefixtures("one_thread_module"), pytest.mark.filterwarnings("ignore::FutureWarning")]

# ---- the learners, in the library ----


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 8))


def noisy_loss(model: nn.Module, batch) -> torch.Tensor:
    """A loss that draws from the global RNG (input noise, and dropout), as the diffusion loss does."""
    x, y = batch
    return F.mse_loss(model(x + 0.3 * torch.randn_like(x)), y)


BATCH = (torch.randn(32, 16, generator=torch.Generator().manual_seed(1)),
         torch.randn(32, 8, generator=torch.Generator().manual_seed(2)))  # fmt: skip
STEPS = 6

LEARNERS = {
    "maskllm": lambda model: pm.MaskLLMLearner(model, noisy_loss, seed=5, total_steps=STEPS, mask_lr=0.05),
    "maskllm-weights": lambda model: pm.MaskLLMLearner(model, noisy_loss, seed=5, total_steps=STEPS, model_lr=1e-2),
    "maskpro": lambda model: pm.MaskProLearner(model, noisy_loss, seed=5, logit_init=1.0, mask_lr=20.0),
    "maskpro-weights": lambda model: pm.MaskProLearner(model, noisy_loss, seed=5, logit_init=1.0, model_lr=1e-2),
}


def _state(learner) -> dict[str, torch.Tensor]:
    tensors, _ = learner.state_dict()
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


@pytest.mark.parametrize("stop", [1, 3, 5])
@pytest.mark.parametrize("kind", list(LEARNERS))
def test_mask_learner_resumes_bit_exactly(kind, stop, tmp_path):
    torch.manual_seed(7)
    straight = LEARNERS[kind](mlp())
    for _ in range(STEPS):
        straight.step(BATCH)

    torch.manual_seed(7)
    first = LEARNERS[kind](mlp())
    for _ in range(stop):
        first.step(BATCH)
    first.save(tmp_path / "learner.safetensors")
    torch.manual_seed(12345)  # a new process: the global RNG is somewhere else
    # With trained weights, a differently initialised model: the weights must come from the file.
    resumed = LEARNERS[kind](mlp(seed=99 if kind.endswith("weights") else 0))
    resumed.load(tmp_path / "learner.safetensors")
    assert resumed.step_count == stop
    for _ in range(STEPS - stop):
        resumed.step(BATCH)

    expected, got = _state(straight), _state(resumed)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    for name, mask in straight.masks().items():
        assert torch.equal(resumed.masks()[name], mask), name
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert list(tmp_path.iterdir()) == [tmp_path / "learner.safetensors"]  # no temporaries


def test_without_the_rng_state_the_resumed_run_would_differ(tmp_path):
    """The defect this suite guards: resuming with the global RNG reseeded instead of restored diverges."""
    torch.manual_seed(7)
    straight = LEARNERS["maskllm"](mlp())
    for _ in range(STEPS):
        straight.step(BATCH)
    torch.manual_seed(7)
    first = LEARNERS["maskllm"](mlp())
    for _ in range(2):
        first.step(BATCH)
    first.save(tmp_path / "learner.safetensors")
    torch.manual_seed(7)  # what learn-mask did before: the config seed again
    resumed = LEARNERS["maskllm"](mlp())
    resumed.load(tmp_path / "learner.safetensors", restore_rng_state=False)
    for _ in range(STEPS - 2):
        resumed.step(BATCH)
    assert any(not torch.equal(resumed.logits[n], straight.logits[n]) for n in straight.logits)


# ---- the structural gate learner ----


def tiny_dit() -> nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
        sample_size=4, patch_size=2, num_embeds_ada_norm=10,
    ).eval()  # fmt: skip


def noisy_forward(model, batch, noisy, timesteps):
    """The default denoiser call on inputs jittered from the global RNG (so its state matters)."""
    return denoiser_output(model, batch, noisy + 0.1 * torch.randn_like(noisy), timesteps)


GATE_BATCH = (torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 7]))


@pytest.mark.parametrize("gate_type,stop", [("hard_concrete", 1), ("sigmoid", 2), ("gumbel_softmax", 2)])
def test_structural_gate_learner_resumes_bit_exactly(gate_type, stop, tmp_path):
    def make():
        return StructuralGateLearner(tiny_dit(), gate_type=gate_type, sparsity_weight=0.5, lr=0.2, seed=3,
                                     timesteps_per_step=1, forward_fn=noisy_forward)  # fmt: skip

    torch.manual_seed(7)
    straight = make()
    for _ in range(3):
        straight.step(GATE_BATCH)
    torch.manual_seed(7)
    first = make()
    for _ in range(stop):
        first.step(GATE_BATCH)
    first.save(tmp_path / "gates.safetensors")
    torch.manual_seed(999)
    resumed = make()
    resumed.load(tmp_path / "gates.safetensors")
    for _ in range(3 - stop):
        resumed.step(GATE_BATCH)
    for name, logits in straight.logits.items():
        assert torch.equal(resumed.logits[name], logits), name
    assert list(tmp_path.iterdir()) == [tmp_path / "gates.safetensors"]


# ---- the CLI jobs ----

LEARN = ["learn-mask", "model=arch:tiny-unet", "steps=4", "batch_size=4", "checkpoint_every=2", "device=cpu"]
FINETUNE = ["finetune", "model=arch:tiny-unet", "finetune.steps=4", "finetune.batch_size=4",
            "finetune.checkpoint_every=2", "finetune.log_every=1", "finetune.progress=false", "device=cpu"]  # fmt: skip


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name]


def _tensors(out: Path, job: str) -> dict[str, torch.Tensor]:
    """What a run produced that must not depend on interruptions: its masks/model and final state."""
    found = {}
    for file in sorted(out.rglob("*.safetensors")):
        relative = str(file.relative_to(out))
        if job == "finetune" and relative.startswith("checkpoints/") and "step-00000004" not in relative:
            continue  # which older checkpoints are kept depends on where the run stopped
        for key, value in load_file(str(file)).items():
            if not key.startswith("rng."):
                found[f"{relative}:{key}"] = value
    return found


def _assert_same_run(out: Path, straight: Path, job: str) -> None:
    expected, got = _tensors(straight, job), _tensors(out, job)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert not _temporaries(out)
    if (straight / "metrics.jsonl").exists():
        assert _losses(out) == _losses(straight)


def _losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, one_thread_module):
    """Uninterrupted runs of each job, made once."""
    root = tmp_path_factory.mktemp("straight")
    cache = {}

    def get(job: str, method: str | None = None) -> Path:
        key = f"{job}-{method}"
        if key not in cache:
            argv = [*LEARN, f"method={method}"] if job == "learn-mask" else FINETUNE
            assert main([*argv, "--out", str(root / key)]) == 0
            cache[key] = root / key
        return cache[key]

    return get


class _Stop(KeyboardInterrupt):
    """Stands for a kill: raised where the run should die, it is not caught as a user error."""


@pytest.mark.parametrize("stop", [2, 3])
@pytest.mark.parametrize("method", ["maskllm", "maskpro"])
def test_learn_mask_stopped_and_resumed_equals_uninterrupted(method, stop, tmp_path, monkeypatch, straight_runs):
    straight = straight_runs("learn-mask", method)
    cls = pm.MaskLLMLearner if method == "maskllm" else pm.MaskProLearner
    original = cls.step

    def dying_step(self, batch):
        if self.step_count == stop:
            raise _Stop
        return original(self, batch)

    out = tmp_path / "run"
    argv = [*LEARN, f"method={method}", "--out", str(out)]
    monkeypatch.setattr(cls, "step", dying_step)
    assert main(argv) == 130
    monkeypatch.setattr(cls, "step", original)
    assert (out / "learner.safetensors").exists() and not (out / "masks.safetensors").exists()
    assert main([*argv, "--resume"]) == 0
    _assert_same_run(out, straight, "learn-mask")


@pytest.mark.parametrize("stop", [1, 3])
def test_finetune_stopped_and_resumed_equals_uninterrupted(stop, tmp_path, monkeypatch, straight_runs):
    from prunedm.train import checkpoint

    straight = straight_runs("finetune")
    original = checkpoint.save_checkpoint
    calls = []

    def dying_save(root, step, tensors, state, keep=2):
        calls.append(step)
        if step > stop:  # dies mid-write: the temporary directory is cleaned up by atomic_dir
            raise _Stop
        return original(root, step, tensors, state, keep)

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save_checkpoint", dying_save)
    assert main([*FINETUNE, "--out", str(out)]) == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    assert main([*FINETUNE, "--out", str(out), "--resume"]) == 0
    _assert_same_run(out, straight, "finetune")


def _plant_temporaries(out: Path) -> list[Path]:
    """What kill -9 leaves in the middle of an atomic write: temporaries beside their targets."""
    planted = [out / f".learner.safetensors{TEMP_MARK}k1", out / f".masks.safetensors{TEMP_MARK}k2",
               out / f".metrics.jsonl{TEMP_MARK}k3"]  # fmt: skip
    for path in planted:
        path.write_bytes(b"half a file")
    if (out / "checkpoints").is_dir():
        half = out / "checkpoints" / f".step-00000004{TEMP_MARK}k4"
        half.mkdir()
        (half / "model.safetensors").write_bytes(b"\0" * 100)
        planted.append(half)
    return planted


@pytest.mark.parametrize("job", ["learn-mask:maskllm", "learn-mask:maskpro", "learn-mask:magnitude", "finetune"])
def test_resume_removes_temporaries_a_kill_left(job, tmp_path, straight_runs):
    name, _, method = job.partition(":")
    straight = straight_runs(name, method or None)
    out = tmp_path / "run"
    argv = ([*LEARN, f"method={method}"] if name == "learn-mask" else FINETUNE) + ["--out", str(out)]
    assert main(argv) == 0
    planted = _plant_temporaries(out)
    assert main([*argv, "--resume"]) == 0
    assert not any(p.exists() for p in planted)
    _assert_same_run(out, straight, name)


def _kill_when(argv: list[str], out: Path, lines: int, timeout: float = 600) -> None:
    """Start `prunedm argv` in a child (one thread, like this process) and kill -9 it once its
    metrics.jsonl has `lines` lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = out.with_name(out.name + ".log")
    with open(log, "wb") as stderr:  # a file, not a pipe: progress bars would fill a pipe and block the child
        child = subprocess.Popen([sys.executable, "-m", "prunedm", *argv], env=env, stdout=stderr, stderr=stderr)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while child.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
                os.kill(child.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL, log.read_text()[-2000:]


@pytest.mark.parametrize("job,lines", [("learn-mask:maskllm", 3), ("learn-mask:maskpro", 2), ("finetune", 3)])
def test_kill_9_mid_run_then_resume_equals_uninterrupted(job, lines, tmp_path, straight_runs):
    name, _, method = job.partition(":")
    straight = straight_runs(name, method or None)
    out = tmp_path / "run"
    argv = ([*LEARN, f"method={method}"] if name == "learn-mask" else FINETUNE) + ["--out", str(out)]
    _kill_when(argv, out, lines)
    assert main([*argv, "--resume"]) == 0
    _assert_same_run(out, straight, name)


def test_learner_state_of_a_finished_run_resumes_to_the_same_masks(tmp_path, straight_runs):
    """--resume of a finished learn-mask run redoes no step and rewrites the same masks."""
    straight = straight_runs("learn-mask", "maskllm")
    out = tmp_path / "run"
    for path in straight.rglob("*"):
        if path.is_file():
            (out / path.relative_to(straight)).parent.mkdir(parents=True, exist_ok=True)
            (out / path.relative_to(straight)).write_bytes(path.read_bytes())
    before = copy.deepcopy(_tensors(out, "learn-mask"))
    assert main([*LEARN, "method=maskllm", "--out", str(out), "--resume"]) == 0
    after = _tensors(out, "learn-mask")
    assert all(torch.equal(after[k], v) for k, v in before.items())
