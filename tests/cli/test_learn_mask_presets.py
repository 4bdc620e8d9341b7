"""learn-mask's learner presets through the CLI: null keys come from the preset, set keys win, the MaskPro
report lands in report.json; prune's gradient-pass report and its channels keys; bad values refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunedm import masks as pm
from prunedm.cli import main
from prunedm.cli.config import ConfigError, load_config
from prunedm.cli.schema import job_defaults, validate_config
from prunedm.masks.maskpro import logit_init_for_budget
from tests.fuzz.conftest import rejects  # noqa: F401  (the fuzz contract's fixture, used by name)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread_module")]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _config(*overrides: str, job: str = "learn-mask") -> dict:
    return validate_config(job, load_config(job_defaults(job), None, ["model=arch:tiny-unet", *overrides]))


def _learner(*overrides: str):
    from prunedm.cli.commands import _learner
    from prunedm.cli.models import load_model

    config = _config(*overrides)
    return _learner(config, load_model(config["model"], 0), lambda model, batch: torch.zeros(()), 2, 4)


def _lr(learner) -> float:
    return learner.mask_optimizer.param_groups[0]["lr"]


def test_maskllm_default_is_the_official_preset_with_its_regulariser():
    # The old default weight_reg: 0.0 switched the official 1e-5 regulariser off (and fixed soft/lr to nothing).
    learner = _learner("method=maskllm", "steps=7")
    assert learner.preset == "official" and learner.hard is False
    assert learner.weight_reg == 1e-5 and learner.weight_reg_kind == "official"
    assert _lr(learner) == 5e-4 and learner.total_steps == 7
    assert learner.tau_range == (4.0, 0.05) and learner.scale_range == (1e2, 5e2)


def test_maskllm_short_preset_and_set_keys_win():
    learner = _learner("method=maskllm", "maskllm.preset=short")
    assert learner.hard is True and learner.weight_reg == 0.0 and _lr(learner) == 5e-3
    learner = _learner("method=maskllm", "maskllm.preset=short", "maskllm.weight_reg=1e-4", "maskllm.hard=false",
                       "maskllm.mask_lr=0.02", "maskllm.tau=[2, 1]", "maskllm.weight_reg_kind=normalized")  # fmt: skip
    assert learner.weight_reg == 1e-4 and learner.hard is False and _lr(learner) == 0.02
    assert learner.tau_range == (2.0, 1.0) and learner.weight_reg_kind == "normalized"


def test_maskllm_init_std_and_prior_strength_reach_the_logits():
    # prior_strength 0+: the logits are the N(0, init_std) draw; their std is init_std to within sampling error.
    learner = _learner("method=maskllm", "maskllm.init_std=0.5", "maskllm.prior_strength=1e-9")
    logits = torch.cat([v.detach().flatten() for v in learner.logits.values()])
    assert abs(float(logits.std()) - 0.5) < 0.02


def test_maskpro_default_is_official_and_short_takes_its_logits_from_the_budget():
    learner = _learner("method=maskpro", "steps=60")
    assert (learner.preset, learner.samples, learner.baseline_kind) == ("official", 1, "ema")
    assert learner.logit_init == 10.0 and learner.mask_lr == 50.0 and learner.baseline_decay == 0.99
    learner = _learner("method=maskpro", "steps=60", "maskpro.preset=short")
    assert (learner.samples, learner.baseline_kind, learner.normalize_advantage) == (4, "loo", True)
    assert learner.logit_init == pytest.approx(logit_init_for_budget(60, 4)) and learner.mask_lr == 1.0
    assert learner.logit_init != logit_init_for_budget(100, 4)  # total_steps is the config's steps


def test_maskpro_set_keys_win_over_the_preset():
    learner = _learner("method=maskpro", "steps=50", "maskpro.logit_init=budget", "maskpro.samples=3",
                       "maskpro.baseline=ema-corrected", "maskpro.baseline_decay=0.5",
                       "maskpro.normalize_advantage=true", "maskpro.mask_lr=2")  # fmt: skip
    assert learner.preset == "official" and learner.logit_init == pytest.approx(logit_init_for_budget(50, 3))
    assert (learner.samples, learner.baseline_kind, learner.baseline_decay) == (3, "ema-corrected", 0.5)
    assert learner.normalize_advantage is True and learner.mask_lr == 2.0


def test_leave_one_out_with_one_sample_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="maskpro.baseline loo .* needs maskpro.samples >= 2, got 1"):
        _config("method=maskpro", "maskpro.baseline=loo")
    with pytest.raises(ConfigError, match="got 1 \\(preset short: baseline loo, samples 4\\)"):
        _config("method=maskpro", "maskpro.preset=short", "maskpro.samples=1")
    assert _config("method=maskllm", "maskpro.baseline=loo")["maskpro"]["baseline"] == "loo"  # not the learner


@pytest.mark.parametrize("name", ["maskpro-short-digits.yaml", "maskllm-short-digits.yaml"])
def test_short_recipes_select_the_short_preset(name):
    config = validate_config("learn-mask", load_config(job_defaults("learn-mask"), CONFIGS / "learn-mask" / name))
    assert config[config["method"]]["preset"] == "short" and config["model"] == "asset:digits-ddpm"


def test_maskpro_run_writes_its_report(tmp_path, capsys):
    base = ["learn-mask", "model=arch:tiny-unet", "steps=3", "batch_size=4"]
    assert main([*base, "method=magnitude", "--out", str(tmp_path / "magnitude")]) == 0
    out = tmp_path / "maskpro"
    # logit_init 1: groups leave their set often, so some flip in 3 steps.
    assert main([*base, "method=maskpro", "maskpro.preset=short", "maskpro.logit_init=1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    learned = load_file(str(out / "masks.safetensors"))
    magnitude = load_file(str(tmp_path / "magnitude" / "masks.safetensors"))
    groups = sum(mask.numel() // 4 for mask in learned.values())
    flipped = 0
    for name, mask in learned.items():
        from prunedm.masks import targets

        module = dict(pm.find_targets(_tiny_unet(), m=4)[0])[name]
        differs = targets.weight_matrix(module, mask.float()) != targets.weight_matrix(module, magnitude[name].float())
        flipped += int(differs.reshape(-1, 4).any(-1).sum())
    info = report["maskpro"]
    assert report["method"] == "maskpro" and report["masks"] == len(learned)
    assert info["groups"] == groups and info["groups_flipped"] == flipped > 0
    assert info["flipped_fraction"] == pytest.approx(flipped / groups)
    assert info["mask_loss"] > 0 and info["initial_mask_loss"] > 0
    assert f"maskpro: {flipped} of {groups} groups flipped" in capsys.readouterr().out


def _tiny_unet():
    from prunedm.cli.models import load_model

    return load_model("arch:tiny-unet", 0)


def test_maskpro_report_of_the_official_preset_flips_nothing_in_a_few_steps(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["learn-mask", "model=arch:tiny-unet", "method=maskpro", "steps=2", "batch_size=4",
                 "--out", str(out)]) == 0  # fmt: skip
    info = json.loads((out / "report.json").read_text())["maskpro"]
    # No flip: the final mask is the magnitude mask, so both losses are the same number on the same noise.
    assert info["groups_flipped"] == 0 and info["mask_loss"] == info["initial_mask_loss"]
    assert "groups flipped (0.00%)" in capsys.readouterr().out


def test_prune_reports_the_gradient_pass(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prune", "model=arch:tiny-unet", "channels.importance=diff-pruning", "channels.max_timesteps=4",
            "channels.round_to=null", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    gradient = report["gradient_pass"]
    assert 1 <= gradient["num_timesteps"] <= 4 and len(gradient["timesteps"]) == gradient["num_timesteps"]
    assert gradient["stride"] == 250 and gradient["timesteps"] == [0, 250, 500, 750][: gradient["num_timesteps"]]
    assert gradient["passes"] >= 1 and gradient["seconds"] > 0 and gradient["threads"] >= 1
    assert report["round_to"] is None
    assert gradient["summary"] in capsys.readouterr().out.splitlines()


def test_prune_without_gradients_has_no_pass_and_rounds_to_2_4(tmp_path):
    out = tmp_path / "out"
    assert main(["prune", "model=arch:tiny-unet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "gradient_pass" not in report and report["round_to"] == 8
    widths = [(b, a) for before, after in report["changed_layers"].values() for b, a in zip(before, after)]
    assert any(a < b for b, a in widths) and all(a % 8 == 0 for b, a in widths if b % 8 == 0)


def test_round_to_2_4_unquoted_in_yaml_is_the_word(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("channels:\n  round_to: 2:4\n")  # YAML 1.1: the base-60 integer 124
    config = validate_config("prune", load_config(job_defaults("prune"), path), rules=False)
    assert config["channels"]["round_to"] == "2:4"
    assert _config("channels.round_to=16", job="prune")["channels"]["round_to"] == 16
    path.write_text("channels:\n  round_to: 2:8\n")  # 128: refused, not a multiple of 128
    with pytest.raises(ConfigError, match=r"channels.round_to must be an integer in \[1, 64\], 2:4 or null, got 128"):
        validate_config("prune", load_config(job_defaults("prune"), path), rules=False)


# (override, words the one error line must hold)
BAD = [
    ("method=maskpro maskpro.preset=fast", ["maskpro.preset must be one of official, short", "'fast'"]),
    ("maskpro.samples=0", ["maskpro.samples must be an integer >= 1 or null", "got 0"]),
    ("maskpro.samples=2.5", ["maskpro.samples must be an integer", "got 2.5"]),
    ("maskpro.baseline=mean", ["maskpro.baseline must be one of ema, ema-corrected, loo or null", "'mean'"]),
    ("maskpro.baseline_decay=1", ["maskpro.baseline_decay must be a number in [0, 1) or null", "got 1"]),
    ("maskpro.baseline_decay=-0.1", ["maskpro.baseline_decay", "got -0.1"]),
    ("maskpro.normalize_advantage=maybe", ["maskpro.normalize_advantage must be true or false or null", "'maybe'"]),
    ("maskpro.logit_init=0", ["maskpro.logit_init must be a number > 0, budget or null", "got 0"]),
    ("maskpro.logit_init=cheap", ["maskpro.logit_init must be a number > 0, budget or null", "'cheap'"]),
    ("maskpro.mask_lr=0", ["maskpro.mask_lr must be a number > 0 or null", "got 0"]),
    ("method=maskpro maskpro.baseline=loo", ["maskpro.baseline loo", "needs maskpro.samples >= 2, got 1"]),
    ("maskllm.preset=paper", ["maskllm.preset must be one of official, short", "'paper'"]),
    ("maskllm.hard=2", ["maskllm.hard must be true or false or null", "got 2"]),
    ("maskllm.mask_lr=-1", ["maskllm.mask_lr must be a number > 0 or null", "got -1"]),
    ("maskllm.init_std=0", ["maskllm.init_std must be a number > 0 or null", "got 0"]),
    ("maskllm.prior_strength=-3", ["maskllm.prior_strength must be a number > 0 or null", "got -3"]),
    ("maskllm.weight_reg=-1e-5", ["maskllm.weight_reg must be a number >= 0 or null", "got -1e-05"]),
    ("maskllm.weight_reg_kind=l2", ["maskllm.weight_reg_kind must be one of official, normalized", "'l2'"]),
    ("maskllm.tau=[4]", ["maskllm.tau must be a list of two numbers > 0 ([start, end]) or null", "got [4]"]),
]
BAD_PRUNE = [
    ("channels.round_to=0", ["channels.round_to must be an integer in [1, 64], 2:4 or null", "got 0"]),
    ("channels.round_to=4.5", ["channels.round_to must be an integer in [1, 64], 2:4 or null", "got 4.5"]),
    ("channels.round_to=2:8", ["channels.round_to must be", "got '2:8'"]),
    ("channels.round_to=two", ["channels.round_to", "got 'two'"]),
    ("channels.max_timesteps=0", ["channels.max_timesteps must be an integer >= 1 or null", "got 0"]),
    ("channels.max_timesteps=all", ["channels.max_timesteps must be an integer >= 1 or null", "got 'all'"]),
]


@pytest.mark.parametrize("override,words", BAD, ids=[case for case, _ in BAD])
def test_bad_learner_keys_are_one_clear_line(rejects, tmp_path, override, words):  # noqa: F811
    out = tmp_path / "out"
    rejects(["learn-mask", "model=arch:tiny-unet", *override.split(), "--out", out], *words, out=out)


@pytest.mark.parametrize("override,words", BAD_PRUNE, ids=[case for case, _ in BAD_PRUNE])
def test_bad_prune_keys_are_one_clear_line(rejects, tmp_path, override, words):  # noqa: F811
    out = tmp_path / "out"
    rejects(["prune", "model=arch:tiny-unet", override, "--out", out], *words, out=out)


def test_demo_passes_its_preset_to_the_learner(tmp_path):
    from prunedm.cli.config import merge_config
    from prunedm.cli.demo import _stage_configs
    from prunedm.cli.schema import DEFAULTS

    for method, preset in (("maskllm", "official"), ("maskpro", "short"), ("magnitude", "short")):
        overrides = [f"learn_mask.method={method}", f"learn_mask.preset={preset}"]
        config = validate_config("demo", load_config(job_defaults("demo"), None, overrides))
        stage = {name: c for name, _, _, c in _stage_configs(config, tmp_path, torch.device("cpu"))}["learn-mask"]
        checked = validate_config("learn-mask", merge_config(DEFAULTS["learn-mask"], stage))
        if method == "magnitude":
            assert "maskllm" not in stage and "maskpro" not in stage
        else:
            assert checked[method]["preset"] == preset
    recipe = load_config(job_defaults("demo"), CONFIGS / "demo" / "diff-pruning-maskpro.yaml")
    assert recipe["learn_mask"]["method"] == "maskpro" and recipe["learn_mask"]["preset"] == "short"
