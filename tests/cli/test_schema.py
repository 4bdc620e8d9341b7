"""The config schema: numbers read as users write them, every key of every job has a documented
range that its default and every shipped recipe satisfy, and values are normalised once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunedm.cli.config import ConfigError, load_config, parse_override, prepare_out_dir, read_resolved, safe_load
from prunedm.cli.schema import SCHEMA, _leaves, describe_keys, job_defaults, validate_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize(
    "text,value", [("1e-4", 1e-4), ("1E5", 1e5), (".5", 0.5), ("-3e-2", -0.03), ("+2.5e+3", 2500.0), ("3", 3)]
)
def test_numbers_parse_as_written_in_overrides_and_files(tmp_path, text, value):
    parsed = parse_override(f"finetune.lr={text}")["finetune"]["lr"]
    assert parsed == value and type(parsed) is type(value)
    path = tmp_path / "c.yaml"
    path.write_text(f"finetune:\n  lr: {text}\n")
    config = load_config(job_defaults("finetune"), path)
    assert config["finetune"]["lr"] == value and type(config["finetune"]["lr"]) is type(value)


def test_lr_1e_4_passes_the_range_check():
    # YAML 1.1 read 1e-4 as the text '1e-4' and the check failed with "'<=' not supported ... str"
    config = load_config(job_defaults("finetune"), None, ["model=arch:tiny-unet", "finetune.lr=1e-4"])
    assert validate_config("finetune", config)["finetune"]["lr"] == 1e-4


def test_text_that_looks_like_a_number_round_trips_through_config_yaml(tmp_path):
    config = {"model": "1e5", "lr": 1e-10, "pattern": "2:4", "inf": float("inf")}
    prepare_out_dir(tmp_path / "run", config, resume=False)
    assert read_resolved(tmp_path / "run") == config
    prepare_out_dir(tmp_path / "run", config, resume=True)  # equal: no "config differs"


def test_values_are_normalised():
    config = load_config(job_defaults("learn-mask"), None, ["model=m", "steps=1e3", "maskllm.tau=[4, 1]"])
    checked = validate_config("learn-mask", config)
    assert checked["steps"] == 1000 and type(checked["steps"]) is int
    assert checked["maskllm"]["tau"] == [4.0, 1.0] and all(type(v) is float for v in checked["maskllm"]["tau"])
    assert config["steps"] == 1e3  # the input is not changed


def test_unquoted_pattern_in_a_yaml_file_is_n_m(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\npattern: 2:4\n")  # YAML 1.1: the base-60 integer 124
    assert validate_config("learn-mask", load_config(job_defaults("learn-mask"), path))["pattern"] == "2:4"


@pytest.mark.parametrize("job", sorted(SCHEMA))
def test_every_key_has_a_documented_range_and_the_defaults_pass(job):
    names = [name for name, _ in _leaves(job_defaults(job))]
    assert sorted(names) == sorted(SCHEMA[job]), "SCHEMA and the defaults list different keys"
    assert all(SCHEMA[job][name].doc for name in names)
    checked = validate_config(job, job_defaults(job), rules=False)
    assert checked == job_defaults(job)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_passes_the_key_checks(recipe):
    validate_config(recipe.parent.name, load_config(job_defaults(recipe.parent.name), recipe), rules=False)


def test_error_names_key_range_and_value():
    config = load_config(job_defaults("finetune"), None, ["model=m", "finetune.lr=-1"])
    with pytest.raises(ConfigError, match=r"^finetune.lr must be a number > 0, got -1$"):
        validate_config("finetune", config)


def test_safe_load_limits():
    assert safe_load("a: &x [1, 2]\nb: *x") == {"a": [1, 2], "b": [1, 2]}  # a few aliases are fine
    with pytest.raises(ConfigError, match="more than 10000 values"):
        safe_load("a: &a [" + ", ".join(["x"] * 100) + "]\nb: [" + ", ".join(["*a"] * 200) + "]")
    with pytest.raises(ConfigError, match="nested more than 32"):
        safe_load("[" * 33 + "]" * 33)
    assert safe_load("[" * 31 + "]" * 31) is not None
    with pytest.raises(yaml.YAMLError):
        safe_load("!!python/name:os.system")


def test_help_lists_every_key_with_its_range(capsys):
    from prunedm.cli import main

    lines = describe_keys("finetune")
    assert "finetune.lr = 0.0001: a number > 0. learning rate" in lines
    assert len(lines) == len(SCHEMA["finetune"])
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "finetune.keep_checkpoints = 2: an integer >= 1." in capsys.readouterr().out


@pytest.mark.parametrize("quick", [False, True])
def test_every_demo_stage_config_passes_its_job_checks(tmp_path, quick):
    import torch

    from prunedm.cli.config import merge_config
    from prunedm.cli.demo import QUICK_OVERRIDES, _stage_configs
    from prunedm.cli.schema import DEFAULTS

    config = load_config(job_defaults("demo"), None, QUICK_OVERRIDES if quick else [])
    for device in ("cpu", "cuda"):
        for _, command, _, stage_config in _stage_configs(config, tmp_path, torch.device(device)):
            checked = validate_config(command, merge_config(DEFAULTS[command], stage_config))
            assert checked["device"] == "auto"


def test_learner_keys_describe_their_null_and_words():
    lines = describe_keys("learn-mask")
    assert "maskpro.logit_init = None: a number > 0, budget or null." in " ".join(lines)
    assert any(line.startswith("maskllm.weight_reg = None: a number >= 0 or null.") for line in lines)
    assert any(line.startswith("maskpro.baseline = None: one of ema, ema-corrected, loo or null.") for line in lines)
    prune = describe_keys("prune")
    assert any(line.startswith("channels.round_to = '2:4': an integer in [1, 64], 2:4 or null.") for line in prune)
    assert any(line.startswith("channels.max_timesteps = 100: an integer >= 1 or null.") for line in prune)


def test_null_learner_keys_pass_and_words_stay_words():
    overrides = ["model=m", "maskpro.logit_init=budget", "maskllm.hard=true"]
    config = load_config(job_defaults("learn-mask"), None, overrides)
    checked = validate_config("learn-mask", config)
    assert checked["maskpro"]["logit_init"] == "budget" and checked["maskllm"]["hard"] is True
    assert checked["maskllm"]["tau"] is None and checked["maskpro"]["samples"] is None
    config = load_config(job_defaults("learn-mask"), None, ["model=m", "maskpro.logit_init=4", "maskllm.tau=[2, 1]"])
    checked = validate_config("learn-mask", config)
    assert checked["maskpro"]["logit_init"] == 4.0 and checked["maskllm"]["tau"] == [2.0, 1.0]
