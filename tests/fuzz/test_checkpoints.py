"""Tampered and damaged resume state (learner.safetensors, finetune checkpoints, gate files), keep_checkpoints
and the other finetune ranges, and the EMA warm-up: one clear error or an exact resume, never a traceback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel

from prunedm.cli import main
from prunedm.masks.state import tensors_digest
from prunedm.train import FinetuneConfig, finetune
from prunedm.train.checkpoint import save_checkpoint
from prunedm.train.finetune import ema_decay_at, ema_update_fn

pytestmark = [pytest.mark.usefixtures("one_thread_module"), pytest.mark.filterwarnings("ignore::FutureWarning")]

LEARN = ["learn-mask", "model=arch:tiny-unet", "method=maskllm", "steps=2", "batch_size=4", "checkpoint_every=1",
         "device=cpu"]  # fmt: skip
FINETUNE = ["finetune", "model=arch:tiny-unet", "finetune.steps=4", "finetune.batch_size=4",
            "finetune.checkpoint_every=2", "finetune.log_every=1", "finetune.progress=false", "device=cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread_module):
    """A finished learn-mask run and a finished finetune run (checkpoints at steps 2 and 4), made once."""
    root = tmp_path_factory.mktemp("runs")
    assert main([*LEARN, "--out", str(root / "learn")]) == 0
    assert main([*FINETUNE, "--out", str(root / "finetune")]) == 0
    return root


def _copy(runs: Path, name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(runs / name, out)
    return out


# ---- learner.safetensors ----


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["prunedm"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _rewrite(path: Path, edit, rehash: bool = True) -> None:
    """Rewrite a state file after edit(tensors, meta); rehash: record the edited tensors' checksum, as a
    file saved by another run (or forged with care) would have."""
    tensors, meta = _read(path)
    edit(tensors, meta)
    if rehash and "sha256" in meta:
        meta["sha256"] = tensors_digest(tensors)
    save_file(tensors, str(path), metadata={"prunedm": json.dumps(meta)})


def _first_logits(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.startswith("learner.logits."))


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _zero_tail(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4096:] = bytes(4096)
    path.write_bytes(bytes(data))


def _zero_head(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:64] = bytes(64)
    path.write_bytes(bytes(data))


LEARNER_TAMPERING = {
    "truncated-half": lambda p: _truncate(p, 0.5),
    "truncated-header": lambda p: _truncate(p, 0.001),
    "empty": lambda p: p.write_bytes(b""),
    "zeroed-data": _zero_tail,
    "zeroed-header": _zero_head,
    "not-safetensors": lambda p: p.write_text("learner state, trust me"),
    "no-prunedm-metadata": lambda p: save_file(load_file(str(p)), str(p)),
    "metadata-not-json": lambda p: save_file(load_file(str(p)), str(p), metadata={"prunedm": "{oops"}),
    "metadata-a-list": lambda p: save_file(load_file(str(p)), str(p), metadata={"prunedm": "[1, 2]"}),
    "values-edited-checksum-kept": lambda p: _rewrite(p, lambda t, m: t[_first_logits(t)].add_(1.0), rehash=False),
    "wrong-logits-shape": lambda p: _rewrite(p, lambda t, m: t.update({_first_logits(t): torch.zeros(2, 3)})),
    "wrong-logits-dtype": lambda p: _rewrite(p, lambda t, m: t.update({_first_logits(t): t[_first_logits(t)].half()})),
    "missing-logits": lambda p: _rewrite(p, lambda t, m: t.pop(_first_logits(t))),
    "extra-tensor": lambda p: _rewrite(p, lambda t, m: t.update({"learner.logits.nope": torch.zeros(1)})),
    "stray-tensor": lambda p: _rewrite(p, lambda t, m: t.update({"payload": torch.zeros(1)})),
    "missing-rng": lambda p: _rewrite(p, lambda t, m: t.pop("rng.cpu")),
    "rng-wrong-size": lambda p: _rewrite(p, lambda t, m: t.update({"rng.cpu": torch.zeros(7, dtype=torch.uint8)})),
    "rng-cuda-gap": lambda p: _rewrite(p, lambda t, m: t.update({"rng.cuda.1": torch.zeros(16, dtype=torch.uint8)})),
    "optimizer-state-shape": lambda p: _rewrite(p, lambda t, m: t.update({"mask_optimizer.0.exp_avg": torch.zeros(3)})),
    "step-negative": lambda p: _rewrite(p, lambda t, m: m.update(step=-1)),
    "step-a-string": lambda p: _rewrite(p, lambda t, m: m.update(step="2")),
    "tau-a-string": lambda p: _rewrite(p, lambda t, m: m["extra"].update(tau="hot")),
    "total-steps-zero": lambda p: _rewrite(p, lambda t, m: m["extra"].update(total_steps=0)),
    "other-class": lambda p: _rewrite(p, lambda t, m: m.update({"class": "MaskProLearner"})),
    "other-targets": lambda p: _rewrite(p, lambda t, m: m.update(targets=m["targets"][:-1])),
    "optimizer-groups": lambda p: _rewrite(p, lambda t, m: m["optimizers"]["mask_optimizer"].update(param_groups=[])),
    **{
        f"missing-{key}": (lambda key: lambda p: _rewrite(p, lambda t, m: m.pop(key)))(key)
        for key in ("class", "n", "m", "seed", "step", "targets", "extra", "optimizers", "sha256")
    },
}


@pytest.mark.parametrize("tampering", list(LEARNER_TAMPERING))
def test_damaged_learner_state_is_one_clear_error(tampering, runs, tmp_path, rejects):
    out = _copy(runs, "learn", tmp_path)
    LEARNER_TAMPERING[tampering](out / "learner.safetensors")
    line = rejects([*LEARN, "--out", out, "--resume"], "learner.safetensors", "delete", out=out)
    assert "--resume" in line


def test_damaged_gate_state_names_the_file(tmp_path):
    import diffusers

    from prunedm.structural import StructuralGateLearner

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=4,
        patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip
    learner = StructuralGateLearner(dit, timesteps_per_step=1)
    learner.step((torch.randn(2, 4, 4, 4), torch.tensor([1, 2])))
    path = tmp_path / "gates.safetensors"
    before = {n: p.detach().clone() for n, p in learner.logits.items()}
    for name, tamper in [
        ("truncated", lambda p: _truncate(p, 0.5)),
        ("wrong-gate-shape", lambda p: _rewrite(p, lambda t, m: t.update({sorted(t)[0]: torch.zeros(5)}))),
        ("missing-step", lambda p: _rewrite(p, lambda t, m: m.pop("step"))),
        ("missing-rng", lambda p: _rewrite(p, lambda t, m: t.pop("rng.cpu"))),
    ]:
        learner.save(path)
        tamper(path)
        with pytest.raises(ValueError, match="gates.safetensors") as caught:
            learner.load(path)
        assert "Traceback" not in str(caught.value), name
        for n, p in learner.logits.items():  # checked before anything changed
            assert torch.equal(p, before[n]), name


# ---- finetune checkpoints ----


def _model_file(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"


def _edit_state(out: Path, step: int, edit) -> None:
    path = out / "checkpoints" / f"step-{step:08d}" / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _wrong_model_tensors(out: Path, step: int) -> None:
    """A model.safetensors of another shape, with its hash updated in state.json (a forged or mixed-up file)."""
    import hashlib

    path = _model_file(out, step)
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    _edit_state(out, step, lambda s: s["files"].update({path.name: hashlib.sha256(path.read_bytes()).hexdigest()}))


CHECKPOINT_TAMPERING = {
    "model-truncated": lambda out, s: _truncate(_model_file(out, s), 0.5),
    "model-zeroed": lambda out, s: _zero_tail(_model_file(out, s)),
    "model-missing": lambda out, s: _model_file(out, s).unlink(),
    "ema-zeroed-header": lambda out, s: _zero_head(_model_file(out, s).with_name("ema.safetensors")),
    "optimizer-truncated": lambda out, s: _truncate(_model_file(out, s).with_name("optimizer.safetensors"), 0.3),
    "model-wrong-tensors": _wrong_model_tensors,
    "state-not-json": lambda out, s: _model_file(out, s).with_name("state.json").write_text("{"),
    "state-a-list": lambda out, s: _model_file(out, s).with_name("state.json").write_text("[]"),
    "state-missing-step": lambda out, s: _edit_state(out, s, lambda st: st.pop("step")),
    "state-missing-optimizer": lambda out, s: _edit_state(out, s, lambda st: st.pop("optimizer")),
    "state-missing-lr-schedule": lambda out, s: _edit_state(out, s, lambda st: st.pop("lr_schedule")),
    "state-step-mismatch": lambda out, s: _edit_state(out, s, lambda st: st.update(step=3)),
    "state-hash-changed": lambda out, s: _edit_state(out, s, lambda st: st["files"].update({"ema.safetensors": "0"})),
}


@pytest.mark.parametrize("tampering", list(CHECKPOINT_TAMPERING))
def test_damaged_newest_checkpoint_falls_back_to_the_older_one_exactly(tampering, runs, tmp_path):
    out = _copy(runs, "finetune", tmp_path)
    CHECKPOINT_TAMPERING[tampering](out, 4)
    with pytest.warns(UserWarning, match="resuming from step-00000002"):
        assert main([*FINETUNE, "--out", str(out), "--resume"]) == 0
    # Steps 3 and 4 were redone from checkpoint 2: the same weights, EMA and optimizer as the first run.
    for name in ("model", "ema", "optimizer"):
        expected = load_file(str(runs / "finetune" / "checkpoints" / "step-00000004" / f"{name}.safetensors"))
        got = load_file(str(out / "checkpoints" / "step-00000004" / f"{name}.safetensors"))
        assert expected.keys() == got.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    final = load_file(str(next((out / "model").glob("*.safetensors"))))
    first = load_file(str(next((runs / "finetune" / "model").glob("*.safetensors"))))
    assert all(torch.equal(final[k], v) for k, v in first.items())


@pytest.mark.parametrize("tampering", ["model-truncated", "model-zeroed", "model-wrong-tensors", "state-not-json",
                                       "state-missing-optimizer", "state-hash-changed"])  # fmt: skip
def test_damaged_only_checkpoint_is_one_clear_error(tampering, runs, tmp_path, rejects):
    out = _copy(runs, "finetune", tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    CHECKPOINT_TAMPERING[tampering](out, 4)
    rejects([*FINETUNE, "--out", out, "--resume"], "cannot resume", "step-00000004", "delete", out=out)


def test_bad_pointer_and_pointer_to_nothing_are_clear(runs, tmp_path, rejects):
    out = _copy(runs, "finetune", tmp_path)
    (out / "checkpoints" / "latest").write_text('{"checkpoint": "../../etc"}')
    rejects([*FINETUNE, "--out", out, "--resume"], "latest", "not a prunedm checkpoint pointer", out=out)
    for old in (out / "checkpoints").glob("step-*"):
        shutil.rmtree(old)
    (out / "checkpoints" / "latest").write_text('{"checkpoint": "step-00000004", "step": 4}')
    rejects([*FINETUNE, "--out", out, "--resume"], "step-00000004", "missing", out=out)


# ---- keep_checkpoints and the other finetune ranges ----


@pytest.mark.parametrize("value", ["-1", "0", "1.5", "two"])
def test_keep_checkpoints_below_one_is_refused_before_any_work(value, tmp_path, rejects):
    out = tmp_path / "run"
    rejects([*FINETUNE, f"finetune.keep_checkpoints={value}", "--out", out], "keep_checkpoints", out=out)


@pytest.mark.parametrize(
    "field,value",
    [("keep_checkpoints", -1), ("keep_checkpoints", 0), ("steps", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -1e-4),
     ("lr", math.nan), ("lr", "1e-4"), ("weight_decay", -0.1), ("warmup_steps", -1), ("ema_decay", 1.0),
     ("ema_decay", -0.5), ("grad_clip", 0.0), ("checkpoint_every", 0), ("log_every", 0), ("ema_warmup", "yes"),
     ("mixed_precision", "fp8"), ("seed", 1.5)],
)  # fmt: skip
def test_finetune_config_ranges_are_checked_before_any_work(field, value, tmp_path):
    config = FinetuneConfig(**{"steps": 2, "batch_size": 4, "progress": False, field: value})
    with pytest.raises(ValueError, match=f"finetune.{field} must be"):
        finetune(torch.nn.Linear(2, 2), torch.zeros(8, 3, 8, 8), tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_save_checkpoint_refuses_to_keep_none(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints must be an integer >= 1"):
        save_checkpoint(tmp_path, 1, {"model": {"w": torch.zeros(2)}}, {}, keep=0)
    assert not list(tmp_path.iterdir())


def test_keep_one_checkpoint_leaves_one_to_resume_from(tmp_path):
    out = tmp_path / "run"
    argv = [*FINETUNE, "finetune.keep_checkpoints=1", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    assert main([*argv, "--resume"]) == 0


# ---- EMA warm-up ----


def test_ema_warmup_schedule_is_diffusers():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.999, 990) == pytest.approx(991 / 1000)
    assert ema_decay_at(0.999, 10_000) == 0.999  # from s = 8991 on
    assert ema_decay_at(0.9, 100) == 0.9
    assert ema_decay_at(0.999, 3, warmup=False) == 0.999


def test_ema_update_follows_the_schedule_exactly():
    model = torch.nn.Linear(3, 2)
    ema = AveragedModel(model, multi_avg_fn=ema_update_fn(0.99, True), use_buffers=True)
    expected = None
    for update in range(6):
        with torch.no_grad():
            model.weight.add_(1.0 + update)
        current = model.weight.detach().clone()
        if expected is None:  # the first update copies
            expected = current
        else:
            decay = ema_decay_at(0.99, update)
            expected = torch.lerp(expected, current, 1 - decay)
        ema.update_parameters(model)
        torch.testing.assert_close(ema.module.weight, expected, rtol=1e-6, atol=1e-6)


def _tiny_unet(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip


@pytest.mark.parametrize("warmup", [True, False])
def test_scored_ema_after_few_steps_is_near_the_trained_weights_with_warmup(warmup, tmp_path):
    start = _tiny_unet()
    model = _tiny_unet()
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    config = FinetuneConfig(steps=10, batch_size=4, lr=1e-2, ema_decay=0.999, ema_warmup=warmup, progress=False)
    result = finetune(model, images, tmp_path, config)

    def flat(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    raw, ema, initial = flat(model), flat(result.ema_model), flat(start)
    relative = float((ema - raw).norm() / (initial - raw).norm())
    # Warm-up: the last updates weigh 10/19, 9/18, ...: the EMA sits near the trained weights. Without it,
    # 0.999 keeps the EMA at the first step's weights, almost as far from the trained ones as the start.
    if warmup:
        assert relative < 0.4, relative
    else:
        assert relative > 0.8, relative
