"""diffusers' own save_pretrained of a sparsified or pruned model is refused at save time, naming the fix,
with nothing written; models diffusers can rebuild still round-trip through it exactly."""

from __future__ import annotations

import copy
import subprocess
import sys

import diffusers
import pytest
import torch
from tiny_models import build, inputs, run

import prunedm
from prunedm.interop import DiffusersSaveError, diffusers_save_problem, guard_diffusers_save

pytestmark = pytest.mark.usefixtures("one_thread_module")

FIX_WORDS = ("prunedm.save_pretrained", "prunedm.load_pretrained", "nothing was written")


def _assert_refused(save, *words):
    with pytest.raises(DiffusersSaveError) as info:
        save()
    message = str(info.value)
    assert "\n" not in message
    for word in (*FIX_WORDS, *words):
        assert word in message
    return message


def _files(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize("name", ["UNet2DModel", "DiTTransformer2DModel"])
def test_sparsified_model_refused_and_earlier_save_untouched(tmp_path, name):
    model = build(name)
    kwargs = inputs(name)
    dense_out = run(model, kwargs)
    out = tmp_path / "model"
    model.save_pretrained(out)  # an earlier, dense save in the same place
    before = {p: (out / p).read_bytes() for p in _files(out)}

    report = prunedm.sparsify(model, backend="dense")
    assert len(report.converted) > 5
    message = _assert_refused(lambda: model.save_pretrained(out), f"{len(report.converted)} layer(s)", "2:4 sparse")
    assert f"{name}.save_pretrained" in message
    assert {p: (out / p).read_bytes() for p in _files(out)} == before
    reloaded = getattr(diffusers, name).from_pretrained(out).eval()
    assert torch.equal(run(reloaded, kwargs), dense_out)

    fresh = tmp_path / "fresh"
    _assert_refused(lambda: model.save_pretrained(fresh, safe_serialization=False))
    assert not fresh.exists()


def test_pipeline_refused_before_any_component_is_written(tmp_path):
    unet = build("UNet2DModel")
    prunedm.sparsify(unet, backend="dense")
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    out = tmp_path / "pipe"
    _assert_refused(lambda: pipe.save_pretrained(out), "component 'unet'", "pipe.unet", "DDPMPipeline(unet=...)")
    assert not out.exists()

    # The sparse component after another: the transformer (first) must not be written either.
    vae = build("AutoencoderKL")
    prunedm.sparsify(vae, backend="dense")
    dit = diffusers.DiTPipeline(build("DiTTransformer2DModel"), vae, diffusers.DDIMScheduler(num_train_timesteps=10))
    _assert_refused(lambda: dit.save_pretrained(out), "component 'vae'")
    assert not out.exists()


def test_copies_and_compiled_wrappers_are_refused(tmp_path):
    model = build("UNet2DModel")
    prunedm.sparsify(model, backend="dense")
    copied = copy.deepcopy(model)
    compiled = torch.compile(model)
    for save in (copied.save_pretrained, compiled.save_pretrained):
        _assert_refused(lambda save=save: save(tmp_path / "m"))
    pipe = diffusers.DDPMPipeline(unet=compiled, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    _assert_refused(lambda: pipe.save_pretrained(tmp_path / "p"), "component 'unet'")
    assert _files(tmp_path) == []


def test_prunedm_round_trip_still_exact_and_reloaded_model_refused(tmp_path):
    model = build("DiTTransformer2DModel")
    prunedm.sparsify(model, backend="dense")
    kwargs = inputs("DiTTransformer2DModel")
    expected = run(model, kwargs)
    prunedm.save_pretrained(model, tmp_path / "saved")
    loaded = prunedm.load_pretrained(tmp_path / "saved")
    assert torch.equal(run(loaded, kwargs), expected)
    _assert_refused(lambda: loaded.save_pretrained(tmp_path / "again"), "2:4 sparse")
    assert not (tmp_path / "again").exists()


def test_channel_pruned_model_refused_when_its_config_does_not_describe_it(tmp_path):
    model = build("UNet2DModel")
    assert diffusers_save_problem(model) is None
    # A layer narrower than the config says (what channel pruning does when the config is not rewritten).
    model.time_embedding.linear_1 = torch.nn.Linear(32, 96)
    model.time_embedding.linear_2 = torch.nn.Linear(96, 128)
    message = _assert_refused(lambda: model.save_pretrained(tmp_path / "m"), "does not describe its shapes")
    assert "'time_embedding.linear_1.weight' is [96, 32] here, [128, 32]" in message
    # Missing tensors would be left random: refused too.
    del model.time_embedding.linear_2.bias
    model.time_embedding.linear_2.register_parameter("bias", None)
    _assert_refused(lambda: model.save_pretrained(tmp_path / "m"), "'time_embedding.linear_2.bias'", "random")
    assert not (tmp_path / "m").exists()


def test_real_channel_pruning_is_refused_or_round_trips(tmp_path):
    model = build("UNet2DModel")
    prunedm.prune_channels(model, importance="magnitude", ratio=0.25)
    kwargs = inputs("UNet2DModel")
    expected = run(model, kwargs)
    if diffusers_save_problem(model) is not None:  # the config does not describe the pruned shapes
        _assert_refused(lambda: model.save_pretrained(tmp_path / "m"))
        prunedm.save_pretrained(model, tmp_path / "saved")
        loaded = prunedm.load_pretrained(tmp_path / "saved")
        assert torch.equal(run(loaded, kwargs), expected)
        _assert_refused(lambda: loaded.save_pretrained(tmp_path / "m"), "does not describe its shapes")
        assert not (tmp_path / "m").exists()
    else:  # it does: diffusers rebuilds it exactly
        model.save_pretrained(tmp_path / "m")
        assert torch.equal(run(diffusers.UNet2DModel.from_pretrained(tmp_path / "m").eval(), kwargs), expected)


def test_explicit_guard_names_reason_and_fix_and_survives_deepcopy(tmp_path):
    model = build("UNet2DModel")
    other = build("UNet2DModel")
    assert guard_diffusers_save(model, "its blocks were removed", "use prunedm.save_pretrained / load_pretrained")
    copied = copy.deepcopy(model)
    for save in (model.save_pretrained, copied.save_pretrained):
        with pytest.raises(DiffusersSaveError, match="its blocks were removed; use prunedm.save_pretrained /"):
            save(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    other.save_pretrained(tmp_path / "other")  # the guard is the model's, not its class's
    assert (tmp_path / "other" / "config.json").is_file()
    with pytest.raises(ValueError, match="reason must be a non-empty string"):
        guard_diffusers_save(model, "")


@pytest.mark.parametrize("name", ["UNet2DModel", "DiTTransformer2DModel"])
def test_plain_models_still_round_trip_through_diffusers(tmp_path, name):
    model = build(name)
    kwargs = inputs(name)
    model.save_pretrained(tmp_path / "m")
    reloaded = getattr(diffusers, name).from_pretrained(tmp_path / "m").eval()
    assert torch.equal(run(reloaded, kwargs), run(model, kwargs))


_FRESH_PROCESS = """
import sys, prunedm
from prunedm.interop import DiffusersSaveError
model = prunedm.load_pretrained(sys.argv[1])  # the first diffusers import of this process happens in here
try:
    model.save_pretrained(sys.argv[2])
except DiffusersSaveError as error:
    print("refused:", error)
"""


def test_fresh_process_loading_a_sparsified_model_is_guarded(tmp_path):
    model = build("UNet2DModel")
    prunedm.sparsify(model, backend="dense")
    prunedm.save_pretrained(model, tmp_path / "saved")
    argv = [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "saved"), str(tmp_path / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: UNet2DModel.save_pretrained(")
    assert "prunedm.load_pretrained" in result.stdout
    assert not (tmp_path / "out").exists()
