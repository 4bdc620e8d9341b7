"""Models and data for the CLI: a local diffusers dir, a prunedm save, or a built-in architecture
(random init, for trying things offline); and the training images a run uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prunedm.architectures import ARCHITECTURES, build
from prunedm.cli.config import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_MODELS = ("digits-ddpm",)  # diffusers models shipped in prunedm/assets


def load_model(spec: str | None, seed: int = 0):
    """The model `spec` names: "arch:<name>" (random init), "asset:digits-ddpm" (the shipped tiny DDPM
    trained on the digits), a prunedm save dir, a diffusers model dir, or a hub id (only when it is
    already in the local cache: these machines may be offline)."""
    if not spec:
        raise ConfigError("no model given: set model=<dir> (a diffusers or prunedm model dir) or model=arch:tiny-unet")
    if not isinstance(spec, str):
        raise ConfigError(f"model must be a string (a dir, arch:NAME or asset:NAME), got {spec!r}")
    if spec.startswith("asset:"):
        name = spec.removeprefix("asset:")
        if name not in SHIPPED_MODELS or not (ASSETS / name / "config.json").is_file():
            shipped = ", ".join(f"asset:{n}" for n in SHIPPED_MODELS)
            raise ConfigError(f"model={spec}: no such shipped model; shipped ones: {shipped}")
        return _load_diffusers(ASSETS / name, json.loads((ASSETS / name / "config.json").read_text()))
    if spec.startswith("arch:"):
        name = spec.removeprefix("arch:")
        if name not in ARCHITECTURES:
            raise ConfigError(f"model={spec}: unknown architecture; built-in ones: {', '.join(ARCHITECTURES)}")
        return build(name, seed=seed)
    path = Path(spec)
    if (path / "structure.json").is_file():
        from prunedm.serialization import load_pretrained

        return load_pretrained(path)
    if (path / "config.json").is_file():
        return _load_diffusers(path, json.loads((path / "config.json").read_text()))
    if path.exists():
        raise ConfigError(f"model={spec}: no model there (expected config.json from diffusers or structure.json)")
    return _load_from_hub_cache(spec)


def _diffusers_class(name: str | None, where: str):
    import diffusers

    cls = getattr(diffusers, name or "", None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError(f"{where}: config.json names class {name!r}, which diffusers does not have")
    return cls


def _load_diffusers(path: Path, config: dict):
    # low_cpu_mem_usage=False: the default asks for `accelerate` and prints an install hint when it is missing
    return _diffusers_class(config.get("_class_name"), str(path)).from_pretrained(path, low_cpu_mem_usage=False)


def _load_from_hub_cache(repo_id: str):
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # any failure here means: no usable local copy
        raise ConfigError(
            f"model={repo_id}: no local copy, and this machine may be offline ({type(exc).__name__}). Download it "
            f"where there is internet (`huggingface-cli download {repo_id} --local-dir DIR`) and pass model=DIR"
        ) from exc
    config_path = next(iter(sorted(local.glob("**/config.json"))), None)
    if config_path is None:
        raise ConfigError(f"model={repo_id}: the cached copy at {local} has no config.json")
    return _load_diffusers(config_path.parent, json.loads(config_path.read_text()))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _folder_images(folder: Path, size: int, channels: int) -> torch.Tensor:
    """Every image under `folder` (sorted by path), as [N, channels, size, size] in [-1, 1] (bicubic resize)."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data={folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if channels not in (1, 3):
        raise ConfigError(f"data={folder}: an image folder feeds models with 1 or 3 input channels, not {channels}")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.float32).reshape(size, size, channels))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (images / 127.5 - 1.0).clamp(-1, 1).contiguous()


def training_images(data: str, model) -> torch.Tensor:
    """Images in [-1, 1] shaped for `model`: data="digits" (shipped with scikit-learn), a folder of
    images (PNG/JPG/..., resized to the model's sample_size; the real-scale path, e.g. CIFAR-10 as
    PNGs), or a .safetensors file whose "images" tensor is [N, C, H, W]."""
    config = model.config
    size, channels = config.sample_size, config.in_channels
    if data == "digits":
        from prunedm.data import DigitsDataset

        images = DigitsDataset("train", size=size).images
        return images.expand(-1, channels, -1, -1).contiguous()
    path = Path(data)
    if path.is_dir():
        return _folder_images(path, size, channels)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(
            f"data={data}: expected 'digits', a folder of images, "
            "or an existing .safetensors file with an 'images' tensor"
        )
    from safetensors.torch import load_file

    images = load_file(str(path)).get("images")
    if images is None or images.dim() != 4 or images.shape[1] != channels:
        raise ConfigError(f"data={data}: needs an 'images' tensor [N, {channels}, H, W]")
    return images.float()
