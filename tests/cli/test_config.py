"""YAML configs with overrides, and the output-directory rules."""

from __future__ import annotations

import pytest
import yaml

from prunedm.cli.config import ConfigError, load_config, parse_override, prepare_out_dir

DEFAULTS = {"seed": 0, "finetune": {"steps": 10, "lr": 1e-4}, "model": None}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  steps: 50\nseed: 3\n")
    config = load_config(DEFAULTS, path, ["finetune.lr=0.001", "model=some/dir"])
    assert config == {"seed": 3, "finetune": {"steps": 50, "lr": 0.001}, "model": "some/dir"}
    assert DEFAULTS["finetune"]["steps"] == 10  # defaults untouched


@pytest.mark.parametrize(
    "override,message",
    [
        ("finetune.stpes=3", r"unknown config key 'finetune.stpes'; did you mean 'steps'\?"),
        ("finetune=3", r"config key 'finetune' must be a mapping"),
        ("steps", r"must look like key=value"),
        ("a..b=1", r"has an empty key"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULTS, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(DEFAULTS, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(DEFAULTS, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DEFAULTS, tmp_path / "broken.yaml")


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    assert parse_override("x=true") == {"x": True}
    assert parse_override("x=null") == {"x": None}


def test_out_dir_rules(tmp_path):
    out = tmp_path / "run"
    prepare_out_dir(out, DEFAULTS, resume=False)
    assert yaml.safe_load((out / "config.yaml").read_text()) == DEFAULTS
    with pytest.raises(ConfigError, match="already holds a run: pass --resume"):
        prepare_out_dir(out, DEFAULTS, resume=False)
    prepare_out_dir(out, DEFAULTS, resume=True)
    changed = {**DEFAULTS, "finetune": {"steps": 11, "lr": 1e-4}}
    with pytest.raises(ConfigError, match="differs from the run .* at finetune.steps"):
        prepare_out_dir(out, changed, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        prepare_out_dir(tmp_path / "other", DEFAULTS, resume=False)


def test_nm_pattern_override_stays_text():
    # YAML 1.1 would read 2:4 as the base-60 integer 124
    assert parse_override("pattern=2:4") == {"pattern": "2:4"}
    assert parse_override("time=1:30:00") == {"time": 5400}  # only N:M is special-cased
