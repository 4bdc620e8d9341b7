"""Tampered saves, model dirs, data files and image folders: each is refused before any size it claims is
allocated, with one line naming the file and the field (CLI), or a ValueError (API); overwrites are atomic."""

from __future__ import annotations

import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import prunedm
from prunedm import serialization
from prunedm._integrity import file_sha256
from prunedm.architectures import build
from prunedm.cli import models as cli_models
from prunedm.nn import SparseConv2d, SparseLinear

pytestmark = [pytest.mark.usefixtures("one_thread_module"), pytest.mark.filterwarnings("ignore::FutureWarning")]
RESNET = "down_blocks.0.resnets.0"
NORM = f"{RESNET}.norm1"  # a GroupNorm of 32 channels


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny UNet saved twice: by prunedm.save_pretrained (save/) and by diffusers (diffusers/)."""
    root = tmp_path_factory.mktemp("pristine")
    model = build("tiny-unet", seed=0).eval()
    prunedm.save_pretrained(model, root / "save")
    model.save_pretrained(root / "diffusers", safe_serialization=True)
    return root


def _copy(pristine: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(pristine / name, tmp_path / name))


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    result = edit(data)
    file.write_text(json.dumps(data if result is None else result))


def _timed_rejects(rejects, argv, *words, out):
    start = time.perf_counter()
    line = rejects(argv, *words, out=out)
    # Generous for a loaded machine and a cold first import; before the checks some cases took minutes.
    assert time.perf_counter() - start < 30, "a tampered file must be refused at once, not after building"
    return line


# ---- structure.json of a prunedm save (prunedm sample model=<dir>) ----


def _set(path: str, value):
    """An edit that sets structure[path] (dotted keys; a module name in brackets) to value."""

    def edit(s):
        target, keys = s, path.split("/")
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _delete(path: str):
    def edit(s):
        target, keys = s, path.split("/")
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return edit


STRUCTURE_CASES = {
    "a-json-list": (lambda s: [s], ["structure.json", "not a prunedm structure"]),
    "a-number": (lambda s: 7, ["structure.json", "not a prunedm structure"]),
    "no-modules": (_delete("modules"), ["structure.json", "lacks", "modules"]),
    "no-config": (_delete("config"), ["structure.json", "lacks", "config"]),
    "modules-a-list": (lambda s: {**s, "modules": list(s["modules"].values())}, ["structure.json", "'modules'"]),
    "config-a-list": (_set("config", [1, 2]), ["structure.json", "'config'", "JSON object"]),
    "config-a-hub-id": (_set("config", "google/ddpm-cifar10-32"), ["structure.json", "'config'", "JSON object"]),
    "class-a-number": (_set("class", 5), ["structure.json", "'class'"]),
    "class-a-pipeline": (_set("class", "DiffusionPipeline"), ["structure.json", "not a diffusers model"]),
    "class-unknown": (_set("class", "os.system"), ["structure.json", "not a diffusers model"]),
    "version-a-string": (_set("version", "1"), ["structure.json", "version"]),
    "version-from-the-future": (_set("version", 99), ["structure.json", "version 99"]),
    "sha-a-number": (_set("weights_sha256", 12), ["structure.json", "weights_sha256"]),
    "layers_per_block-10000": (_set("config/layers_per_block", 10000), ["structure.json", "config.layers_per_block"]),
    "huge-channels": (_set("config/block_out_channels", [2**21, 2**22]), ["structure.json", "block_out_channels"]),
    "huge-groups": (_set("config/norm_num_groups", 10**9), ["structure.json", "config.norm_num_groups"]),
    "long-block-list": (
        _set("config/down_block_types", ["DownBlock2D"] * 1000),
        ["structure.json", "down_block_types"],
    ),
    "deep-nesting": (_set("config/extra", [[[[[[[1]]]]]]]), ["structure.json", "config.extra"]),
    "unbuildable-config": (_set("config/block_out_channels", "abc"), ["structure.json", "from_config failed"]),
    "entry-a-list": (_set(f"modules/{NORM}", [1]), ["structure.json", NORM, "JSON object"]),
    "entry-without-parameters": (_delete(f"modules/{NORM}/parameters"), ["structure.json", NORM, "'parameters'"]),
    "entry-extra-a-list": (_set(f"modules/{NORM}/extra", [1]), ["structure.json", NORM, "'extra'"]),
    "shape-negative": (_set(f"modules/{NORM}/parameters/weight", [-1]), ["structure.json", NORM, "shape"]),
    "shape-a-string": (_set(f"modules/{NORM}/parameters/weight", "32"), ["structure.json", NORM, "shape"]),
    "shape-20-dims": (_set(f"modules/{NORM}/parameters/weight", [1] * 20), ["structure.json", NORM, "shape"]),
    "shape-huge": (
        _set(f"modules/{NORM}/parameters/weight", [10**6, 10**6]),
        ["structure.json", NORM, "claims shape [1000000, 1000000]", "the weights hold shape [32]"],
    ),
    "ghost-buffer": (
        _set(f"modules/{NORM}/buffers/ghost", [10**9]),
        ["structure.json", "ghost", "no such tensor"],
    ),
    "private-attribute": (_set(f"modules/{NORM}/attributes/_parameters", {}), ["structure.json", "'_parameters'"]),
    "attribute-hides-a-module": (_set(f"modules/{RESNET}/attributes/conv1", 3), ["structure.json", "hide"]),
    "attribute-of-another-type": (
        _set(f"modules/{NORM}/attributes/num_channels", "many"),
        ["structure.json", "num_channels", "a string"],
    ),
    "channel-selected-norm-kept-2**40": (
        lambda s: s["modules"][NORM].update({"class": "ChannelSelectedNorm", "extra": {"kept": 2**40}}),
        ["structure.json", NORM, "kept", str(2**40)],
    ),
    "channel-selected-norm-kept-a-string": (
        lambda s: s["modules"][NORM].update({"class": "ChannelSelectedNorm", "extra": {"kept": "all"}}),
        ["structure.json", NORM, "kept"],
    ),
    "sparse-layer-without-config": (
        lambda s: s["modules"]["conv_in"].update({"class": "SparseConv2d", "extra": {}}),
        ["structure.json", "conv_in", "cannot be rebuilt"],
    ),
    "module-missing": (_delete(f"modules/{NORM}"), ["structure.json", "other modules", NORM]),
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_tampered_structure_is_refused_by_the_cli(pristine, tmp_path, rejects, case):
    edit, words = STRUCTURE_CASES[case]
    save = _copy(pristine, tmp_path, "save")
    _edit_json(save / "structure.json", edit)
    _timed_rejects(rejects, ["sample", f"model={save}", "--device", "cpu", "--out", tmp_path / "out"], *words,
                   out=tmp_path / "out")  # fmt: skip


@pytest.mark.parametrize(
    "text, words",
    [("{not json", "not valid JSON"), ("", "not valid JSON"), ("\udcff", "not valid JSON"), ("[" * 100000, "JSON")],
    ids=["invalid", "empty", "not-utf8", "deeply-nested"],
)
def test_unreadable_structure_is_refused(pristine, tmp_path, text, words):
    save = _copy(pristine, tmp_path, "save")
    (save / "structure.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=words):
        prunedm.load_pretrained(save)


def test_oversized_structure_is_refused_before_parsing(pristine, tmp_path, monkeypatch):
    save = _copy(pristine, tmp_path, "save")
    monkeypatch.setattr(serialization, "MAX_STRUCTURE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"structure\.json is \d+ bytes"):
        prunedm.load_pretrained(save)


def test_real_channel_selected_norm_with_a_tampered_kept_count(tmp_path):
    """A save holding a real ChannelSelectedNorm: its claimed buffer size must be the file's, and its count sane."""
    from tiny_models import build as build_tiny

    from prunedm.structural import norm_layout, prune_norm_channels

    model = build_tiny("UNet2DConditionModel")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.norm1"
    layout = norm_layout(model, name)
    mask = torch.ones(layout.units, dtype=torch.bool)
    mask[::3] = False
    assert prune_norm_channels(model, name, layout, mask)
    prunedm.save_pretrained(model, tmp_path / "m")
    assert prunedm.load_pretrained(tmp_path / "m").get_submodule(name).kept.numel() == int(mask.sum())
    _edit_json(tmp_path / "m" / "structure.json", _set(f"modules/{name}/buffers/kept", [2**36]))
    with pytest.raises(ValueError, match=r"claims shape \[68719476736\], the weights hold shape \[21\]"):
        prunedm.load_pretrained(tmp_path / "m")
    _edit_json(tmp_path / "m" / "structure.json", _set(f"modules/{name}/buffers/kept", [21]))
    _edit_json(tmp_path / "m" / "structure.json", _set(f"modules/{name}/extra/kept", 2**36))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{name}.*\"kept\" must be a channel count in \[0, 32\]"):
        prunedm.load_pretrained(tmp_path / "m")
    assert time.perf_counter() - start < 2


# ---- model.safetensors of a prunedm save ----


def _header_bytes(data: bytes) -> tuple[int, dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def _with_header(data: bytes, edit) -> bytes:
    _, header, rest = _header_bytes(data)
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + rest


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


WEIGHT_CASES = {
    "truncated-half": (lambda d: d[: len(d) // 2], "model.safetensors"),
    "truncated-to-4-bytes": (lambda d: d[:4], "not a safetensors file"),
    "empty": (lambda d: b"", "not a safetensors file"),
    "header-length-2**60": (lambda d: (2**60).to_bytes(8, "little") + d[8:], "header length is invalid"),
    "header-not-json": (lambda d: d[:8] + b"\xff" * (len(d) - 8), "not a safetensors file"),
    "header-a-list": (lambda d: b"\x02" + b"\x00" * 7 + b"[]", "not a JSON object"),
    "offsets-past-the-end": (
        lambda d: _with_header(d, lambda h: h[_first_tensor(h)].update(data_offsets=[0, 10**12])),
        "inconsistent",
    ),
    "shape-bigger-than-its-bytes": (
        lambda d: _with_header(d, lambda h: h[_first_tensor(h)].update(shape=[10**6, 10**6])),
        "inconsistent",
    ),
    "one-bit-flipped": (lambda d: d[:-9] + bytes([d[-9] ^ 1]) + d[-8:], "does not match"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_tampered_weights_are_refused(pristine, tmp_path, rejects, case):
    tamper, words = WEIGHT_CASES[case]
    save = _copy(pristine, tmp_path, "save")
    weights = save / "model.safetensors"
    weights.write_bytes(tamper(weights.read_bytes()))
    if case != "one-bit-flipped":  # forged together: the structure holds the tampered file's checksum
        _edit_json(save / "structure.json", _set("weights_sha256", file_sha256(weights)))
    _timed_rejects(rejects, ["sample", f"model={save}", "--device", "cpu", "--out", tmp_path / "out"],
                   "model.safetensors", words, out=tmp_path / "out")  # fmt: skip


# ---- config.json of a diffusers model dir (prunedm sample model=<dir>) ----

CONFIG_CASES = {
    "a-json-list": (lambda c: [c], ["config.json", "must be a JSON object", "a JSON list"]),
    "a-number": (lambda c: 3, ["config.json", "must be a JSON object", "a number"]),
    "a-string": (lambda c: "UNet2DModel", ["config.json", "must be a JSON object", "a string"]),
    "layers_per_block-10000": (_set("layers_per_block", 10000), ["config.json", "layers_per_block", "10000"]),
    "huge-channels": (_set("block_out_channels", [2**21, 2**21]), ["config.json", "block_out_channels"]),
    "other-channels": (_set("block_out_channels", [64, 128]), ["config.json", "does not match", "[64"]),
    "other-in_channels": (_set("in_channels", 3), ["config.json", "does not match", "conv_in.weight"]),
    "bigger-model-than-its-weights": (
        _set("down_block_types", ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]),
        ["config.json"],
    ),
    "huge-sample_size": (_set("sample_size", 10**7), ["config.json", "sample_size"]),
    "huge-groups": (_set("norm_num_groups", 10**8), ["config.json", "norm_num_groups"]),
    "long-block-list": (_set("down_block_types", ["DownBlock2D"] * 500), ["config.json", "down_block_types"]),
    "no-class-name": (_delete("_class_name"), ["config.json", "_class_name None"]),
    "class-name-a-number": (_set("_class_name", 5), ["config.json", "_class_name 5"]),
    "class-name-a-pipeline": (_set("_class_name", "DDPMPipeline"), ["config.json", "not a diffusers model class"]),
    "unbuildable": (_set("block_out_channels", "wide"), ["config.json", "cannot be built"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_tampered_model_config_is_refused_by_the_cli(pristine, tmp_path, rejects, case):
    edit, words = CONFIG_CASES[case]
    model_dir = _copy(pristine, tmp_path, "diffusers")
    _edit_json(model_dir / "config.json", edit)
    _timed_rejects(rejects, ["sample", f"model={model_dir}", "--device", "cpu", "--out", tmp_path / "out"], *words,
                   out=tmp_path / "out")  # fmt: skip


@pytest.mark.parametrize(
    "tamper, words",
    [
        (lambda d: (d / "config.json").write_text("{oops"), ["config.json", "not valid JSON"]),
        (lambda d: (d / "config.json").write_bytes(b"\xff\xfe"), ["config.json", "not valid JSON"]),
        (lambda d: (d / "diffusion_pytorch_model.safetensors").unlink(), ["diffusion_pytorch_model.safetensors"]),
        (lambda d: (d / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{"),
         ["diffusion_pytorch_model.safetensors", "not a safetensors file"]),
    ],
    ids=["invalid-json", "not-utf8", "no-weights", "truncated-weights"],
)  # fmt: skip
def test_broken_model_dir_is_refused_by_the_cli(pristine, tmp_path, rejects, tamper, words):
    model_dir = _copy(pristine, tmp_path, "diffusers")
    tamper(model_dir)
    _timed_rejects(rejects, ["sample", f"model={model_dir}", "--device", "cpu", "--out", tmp_path / "out"], *words,
                   out=tmp_path / "out")  # fmt: skip


# ---- data= files and image folders (prunedm finetune data=...) ----


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _images_file(path: Path, tensor: dict) -> Path:
    save_file(tensor, str(path))
    return path


def _png(width: int, height: int, body: bytes | None = None) -> bytes:
    """A grayscale PNG that claims width x height (the pixel data may be shorter: a bomb or a truncation)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if body is None:
        body = zlib.compress(b"\x00" + b"\x80" * width)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _good_png() -> bytes:
    rows = b"".join(b"\x00" + bytes(range(0, 256, 16)) for _ in range(16))
    return _png(16, 16, zlib.compress(rows))


DATA_CASES = {
    "truncated-safetensors": (
        lambda t: _write(t / "d.safetensors", (t / "ok.safetensors").read_bytes()[:-100]),
        ["d.safetensors"],
    ),
    "garbage-safetensors": (
        lambda t: _write(t / "d.safetensors", b"\x00" * 64),
        ["d.safetensors", "not a safetensors file"],
    ),
    "no-images-tensor": (
        lambda t: _images_file(t / "d.safetensors", {"pixels": torch.zeros(2, 1, 16, 16)}),
        ["data=", "'images' tensor"],
    ),
    "images-3-dims": (
        lambda t: _images_file(t / "d.safetensors", {"images": torch.zeros(2, 16, 16)}),
        ["data=", "'images' tensor", "[2, 16, 16]"],
    ),
    "images-3-channels": (
        lambda t: _images_file(t / "d.safetensors", {"images": torch.zeros(2, 3, 16, 16)}),
        ["data=", "[N, 1, H, W]"],
    ),
    "images-none": (
        lambda t: _images_file(t / "d.safetensors", {"images": torch.zeros(0, 1, 16, 16)}),
        ["data=", "non-empty"],
    ),
    "images-integers": (
        lambda t: _images_file(t / "d.safetensors", {"images": torch.zeros(2, 1, 16, 16, dtype=torch.int64)}),
        ["data=", "dtype I64"],
    ),
    "png-decompression-bomb": (
        lambda t: _folder(t, {"a.png": _good_png(), "bomb.png": _png(30000, 30000)}),
        ["data=", "bomb.png"],
    ),
    "png-just-over-the-per-image-cap": (
        lambda t: _folder(t, {"big.png": _png(8193, 8192)}),
        ["data=", "big.png", "8193x8192"],
    ),
    "corrupt-png": (lambda t: _folder(t, {"a.png": b"\x89PNG not really"}), ["data=", "a.png", "not a readable image"]),
    "truncated-png": (
        lambda t: _folder(t, {"a.png": _good_png()[:40]}),
        ["data=", "a.png", "not a readable image"],
    ),
    "text-named-jpg": (lambda t: _folder(t, {"x.jpg": b"hello"}), ["data=", "x.jpg", "not a readable image"]),
    "empty-folder": (lambda t: _folder(t, {}), ["data=", "no images"]),
    "only-text-files": (lambda t: _folder(t, {"readme.txt": b"hi"}), ["data=", "no images"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_training_data_is_refused_by_the_cli(tmp_path, rejects, case):
    make, words = DATA_CASES[case]
    save_file({"images": torch.zeros(4, 1, 16, 16)}, str(tmp_path / "ok.safetensors"))
    data = make(tmp_path)
    argv = ["finetune", "model=arch:tiny-unet", f"data={data}", "--device", "cpu", "--out", tmp_path / "out"]
    _timed_rejects(rejects, argv, *words, out=tmp_path / "out")


def test_image_folders_are_capped_in_total_pixels(tmp_path, monkeypatch):
    folder = _folder(tmp_path, {f"{i}.png": _good_png() for i in range(4)})
    model = build("tiny-unet", seed=0)
    assert cli_models.training_images(str(folder), model).shape == (4, 1, 16, 16)
    monkeypatch.setattr(cli_models, "MAX_TOTAL_PIXELS", 3 * 256)
    with pytest.raises(ValueError, match=r"more than 768 pixels in all \(at .*3\.png\)"):
        cli_models.training_images(str(folder), model)


# ---- save_pretrained over an existing save is atomic ----


def test_overwriting_a_save_that_fails_midway_keeps_the_old_one(tmp_path, monkeypatch):
    old, new = build("tiny-unet", seed=0).eval(), build("tiny-unet", seed=1).eval()
    prunedm.save_pretrained(old, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")

    def fail_after_the_weights(directory, structure, tensors):
        save_file({k: v for k, v in tensors.items()}, str(directory / serialization.WEIGHTS_FILE))
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(serialization, "_write_files", fail_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        prunedm.save_pretrained(new, tmp_path / "m")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporaries beside it
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "notes.txt", "structure.json"]
    loaded = prunedm.load_pretrained(tmp_path / "m")
    assert torch.equal(loaded.conv_in.weight, old.conv_in.weight)
    # A complete overwrite replaces it (other files kept), again leaving nothing beside it.
    prunedm.save_pretrained(new, tmp_path / "m")
    assert torch.equal(prunedm.load_pretrained(tmp_path / "m").conv_in.weight, new.conv_in.weight)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwrite_never_shows_a_half_written_directory(tmp_path, monkeypatch):
    # While the new save is being written, the target still holds the complete old save.
    old, new = build("tiny-unet", seed=0).eval(), build("tiny-unet", seed=1).eval()
    prunedm.save_pretrained(old, tmp_path / "m")
    seen = []
    real = serialization._write_files

    def spy(directory, structure, tensors):
        real(directory, structure, tensors)
        seen.append(prunedm.load_pretrained(tmp_path / "m").conv_in.weight.clone())

    monkeypatch.setattr(serialization, "_write_files", spy)
    prunedm.save_pretrained(new, tmp_path / "m")
    assert torch.equal(seen[0], old.conv_in.weight)


# ---- sparse layers refuse state dicts of another logical shape ----


@pytest.mark.parametrize(
    "make_source, make_target, expected, got",
    [
        (lambda: SparseLinear(40, 8), lambda: SparseLinear(36, 8), [8, 36], [8, 40]),
        (lambda: SparseLinear(32, 8), lambda: SparseLinear(32, 6), [6, 32], [8, 32]),
        (lambda: SparseLinear(36, 8), lambda: SparseLinear(40, 8), [8, 40], [8, 36]),
        (lambda: SparseConv2d(4, 8, 3), lambda: SparseConv2d(12, 8, 2), [8, 12, 2, 2], [8, 4, 3, 3]),
    ],
    ids=["linear-fewer-inputs", "linear-fewer-outputs", "linear-more-inputs", "conv-smaller-kernel"],
)
def test_sparse_layer_refuses_a_state_dict_of_another_shape(make_source, make_target, expected, got):
    torch.manual_seed(0)
    source, target = make_source(), make_target()
    assert source.values.shape == target.values.shape  # both pad to the same packed size
    with pytest.raises(RuntimeError, match=rf"shape {got}, this layer is {expected}".replace("[", r"\[")):
        target.load_state_dict(source.state_dict())


def test_sparse_layer_loaded_from_a_file_refuses_weights_in_its_padding(tmp_path):
    # A state dict read back from safetensors carries no metadata: weights in the padding give it away.
    dense = torch.nn.Linear(40, 8)
    source = SparseLinear.from_dense(dense)
    save_file(source.state_dict(), str(tmp_path / "s.safetensors"))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "s.safetensors"))
    with pytest.raises(RuntimeError, match=r"SparseLinear \(root\): the state dict holds weights outside .* \[8, 36\]"):
        SparseLinear(36, 8).load_state_dict(state)
    same = SparseLinear(40, 8)
    same.load_state_dict(state)
    assert torch.equal(same.values, source.values)


@pytest.mark.parametrize("where", ["structure", "config"])
def test_claimed_depth_is_refused_within_two_seconds(pristine, tmp_path, where):
    # layers_per_block=10000 used to build for 285 s and 2.6 GB before any check.
    name = "save" if where == "structure" else "diffusers"
    model_dir = _copy(pristine, tmp_path, name)
    file = model_dir / ("structure.json" if where == "structure" else "config.json")
    _edit_json(file, _set("config/layers_per_block" if where == "structure" else "layers_per_block", 10000))
    load = prunedm.load_pretrained if where == "structure" else (lambda d: cli_models.load_model(str(d)))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"layers_per_block = 10000 is out of range \(at most 128\)"):
        load(model_dir)
    assert time.perf_counter() - start < 2


def test_many_layers_in_many_blocks_are_refused():
    # Each count within bounds, the product not: 100 layers per block in 6 blocks would take minutes to build.
    config = {"layers_per_block": 100, "down_block_types": ["DownBlock2D"] * 6, "block_out_channels": [32] * 6}
    with pytest.raises(ValueError, match=r"x\.json: config describes 100 layers in each of 6 blocks, more than 512"):
        serialization.check_config(config, "x.json")
    serialization.check_config({**config, "layers_per_block": 80}, "x.json")
