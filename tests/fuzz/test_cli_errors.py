"""Hostile or careless command lines and config files: malformed overrides, YAML alias bombs, huge,
binary or misplaced --config files, bad flags, --resume without a run, a DiT given to `sample`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Nine levels of ten aliases each: 10^9 strings once expanded ("billion laughs").
ALIAS_BOMB = "lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


def _sample(out, *extra):
    return ["sample", "model=arch:tiny-unet", *extra, "--out", out]


MALFORMED = [
    (["steps"], ["override 'steps' must look like key=value"]),
    (["=3"], ["override '=3' has an empty key"]),
    (["a..b=1"], ["override 'a..b=1' has an empty key"]),
    ([".steps=1"], ["has an empty key"]),
    (["steps=[1, 2"], ["override 'steps=[1, 2': the value is not valid YAML"]),
    (["steps={a: 1"], ["the value is not valid YAML"]),
    (["steps=!!python/object:os.system x"], ["the value is not valid YAML"]),
    (["steps=&a [1, *a]"], ["alias refers to a node that contains it"]),
    (["steps=" + "[" * 40 + "]" * 40], ["nested more than 32 levels deep"]),
    (["steps=[&a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], " + ", ".join(["[" + ", ".join(["*a"] * 40) + "]"] * 40) + "]"],
     ["more than 10000 values once anchors and aliases"]),
]  # fmt: skip


@pytest.mark.parametrize("overrides,words", MALFORMED, ids=[o[0][:24] for o, _ in MALFORMED])
def test_malformed_override(rejects, tmp_path, overrides, words):
    out = tmp_path / "out"
    rejects(_sample(out, *overrides), *words, out=out)


CONFIG_FILES = [
    ("bomb.yaml", ALIAS_BOMB, ["--config", "bomb.yaml", "more than 10000 values once anchors and aliases"]),
    ("recursive.yaml", "a: &a [1, *a]\n", ["recursive.yaml", "alias refers to a node that contains it"]),
    ("deep.yaml", "a: " + "[" * 200 + "]" * 200 + "\n", ["deep.yaml", "nested more than 32 levels deep"]),
    ("deep-map.yaml", "".join(f"{'  ' * i}k{i}:\n" for i in range(60)), ["nested more than 32 levels deep"]),
    ("huge.yaml", "# padding\n" * 200_000, ["huge.yaml", "bytes; a config file may have at most 1048576"]),
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", ["binary.yaml", "not a text file"]),
    ("nul.yaml", "steps: 1\x00\n", ["nul.yaml", "not valid YAML"]),
    ("list.yaml", "- 1\n- 2\n", ["list.yaml", "expected a mapping at the top level, got list"]),
    ("scalar.yaml", "42\n", ["scalar.yaml", "expected a mapping at the top level, got int"]),
    ("broken.yaml", "steps: [1, 2\n", ["broken.yaml", "not valid YAML", "line"]),
    ("tab.yaml", "steps:\n\t- 1\n", ["tab.yaml", "not valid YAML"]),
    ("python.yaml", "steps: !!python/object/apply:os.system [echo hi]\n", ["python.yaml", "not valid YAML"]),
    ("dup-docs.yaml", "steps: 1\n---\nsteps: 2\n", ["dup-docs.yaml", "not valid YAML"]),
    ("unhashable.yaml", "? [a, b]\n: 1\n", ["unhashable.yaml", "not valid YAML"]),
    ("unknown.yaml", "stepz: 3\n", ["unknown config key 'stepz'", "did you mean 'steps'"]),
    ("bad-value.yaml", "steps: -2\n", ["steps must be an integer in [1, 1000], got -2"]),
    ("date.yaml", "seed: 2024-01-01\n", ["seed must be an integer", "datetime.date"]),
    ("inf.yaml", "num_samples: 1e400\n", ["num_samples must be an integer", "got inf"]),
]


@pytest.mark.parametrize("name,content,words", CONFIG_FILES, ids=[name for name, _, _ in CONFIG_FILES])
def test_bad_config_file(rejects, tmp_path, name, content, words):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    out = tmp_path / "out"
    rejects(_sample(out, "--config", path), *words, out=out)


def test_config_is_a_directory_or_missing(rejects, tmp_path):
    out = tmp_path / "out"
    rejects(_sample(out, "--config", tmp_path), "--config", "is a directory, expected a YAML file", out=out)
    rejects(_sample(out, "--config", tmp_path / "nope.yaml"), "nope.yaml: no such file", out=out)
    rejects(_sample(out, "--config", "/dev/null"), "--config /dev/null: not a regular file", out=out)


def test_unreadable_config(rejects, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "secret.yaml"
    path.write_text("steps: 1\n")
    path.chmod(0)
    out = tmp_path / "out"
    rejects(_sample(out, "--config", path), "secret.yaml", "cannot read it", out=out)


FLAGS = [
    (["sample", "model=arch:tiny-unet", "--device", "tpu"], ["argument --device: invalid choice: 'tpu'"]),
    (["sample", "model=arch:tiny-unet", "--dtype", "int8"], ["argument --dtype: invalid choice: 'int8'"]),
    (["sample", "model=arch:tiny-unet", "--seed", "abc"], ["argument --seed: invalid int value: 'abc'"]),
    (["sample", "model=arch:tiny-unet", "--seed", "-1"], ["seed must be an integer in [0, 4294967295], got -1"]),
    (["finetune", "model=arch:tiny-unet", "--seed", "-1"], ["finetune.seed must be an integer", "got -1"]),
    (["sample", "model=arch:tiny-unet", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    (["prune", "model=arch:tiny-unet", "--dtype", "float16"], ["unrecognized arguments: --dtype"]),
    (["demo", "--quick", "finetune.lr=-1"], ["finetune.lr must be a number > 0, got -1"]),
    (["sample", "--seed", "1", "model=arch:tiny-unet", "stray"], ["override 'stray' must look like key=value"]),
    (["sample", "model=arch:tiny-unet", "--seed", "1", "stray"], ["unrecognized arguments: stray"]),
    (["sample", "model=arch:tiny-unet", "--seed", "1", "--x=1"], ["unrecognized arguments: --x=1"]),
    (["sample", "--seed", "1", "model=arch:tiny-unet", "steps=0"], ["steps must be an integer in [1, 1000], got 0"]),
]  # fmt: skip


@pytest.mark.parametrize("argv,words", FLAGS, ids=[" ".join(a[2:]) for a, _ in FLAGS])
def test_bad_flag(rejects, tmp_path, argv, words):
    out = tmp_path / "out"
    rejects([*argv, "--out", out], *words, out=out)


def test_missing_out_and_unknown_command(rejects):
    rejects(["sample", "model=arch:tiny-unet"], "the following arguments are required: --out")
    rejects(["prunee"], "invalid choice: 'prunee'")


def test_device_cuda_without_cuda(rejects, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = tmp_path / "out"
    rejects(_sample(out, "--device", "cuda"), "device=cuda: no CUDA device is visible", out=out)
    rejects(["bench", "--out", out, "--device", "cuda"], "--device cuda: no CUDA device is visible", out=out)


def test_bench_bad_suite(rejects, tmp_path):
    out = tmp_path / "out"
    rejects(["bench", "--out", out, "--suite", "ops,gpus"], "--suite takes a comma-separated subset", out=out)
    rejects(["bench", "--out", out, "--suite", ","], "--suite", out=out)


def test_resume_without_a_run(rejects, tmp_path):
    missing = tmp_path / "missing"
    rejects(_sample(missing, "--resume"), "--resume", "does not exist", out=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    rejects(_sample(empty, "--resume"), "--resume", "holds no run (no config.yaml)", out=empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rejects(_sample(other, "--resume"), "holds no run", out=other)


def test_resume_with_a_tampered_config_yaml(rejects, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("- not\n- a config\n")
    rejects(_sample(out, "--resume"), "config.yaml is not a run config", out=out)
    (out / "config.yaml").write_text(ALIAS_BOMB)
    rejects(_sample(out, "--resume"), "config.yaml is not a readable run config", out=out)


def test_out_is_a_file(rejects, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    rejects(_sample(out), "--out", "is a file; expected a directory", out=out)
    assert out.read_text() == "x"


def test_empty_out_dir_stays_empty_after_a_failed_run(rejects, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rejects(["sample", "model=arch:nope", "--out", out], "unknown architecture", out=out)
    assert out.is_dir() and not any(out.iterdir())


def test_sample_refuses_a_dit_class_it_does_not_have_and_writes_nothing(rejects, tmp_path):
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                num_embeds_ada_norm=1000)  # fmt: skip
    dit.save_pretrained(tmp_path / "dit")
    out = tmp_path / "out"
    rejects(
        ["sample", f"model={tmp_path / 'dit'}", "steps=1", "num_samples=1", "class_labels=[1000]", "--out", out],
        "class_labels: 1000 is not a class of this DiTTransformer2DModel",
        "ids 0..999",
        out=out,
    )


def test_a_bug_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    """A programmer error still shows its traceback, but a new run's --out does not stay behind."""
    from prunedm.cli import commands, main

    def broken(config, out, resume):
        (out / "half.txt").write_text("half")
        raise KeyError("a bug")

    monkeypatch.setitem(commands.RUNNERS, "sample", broken)
    out = tmp_path / "out"
    with pytest.raises(KeyError, match="a bug"):
        main([str(a) for a in _sample(out)])
    assert not out.exists()
