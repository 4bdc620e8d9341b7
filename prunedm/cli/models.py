"""Models and data for the CLI: a local diffusers dir, a prunedm save, or a built-in architecture
(random init, for trying things offline); and the training images a run uses."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from prunedm._optional import optional_import
from prunedm.architectures import ARCHITECTURES, build
from prunedm.cli.config import ConfigError
from prunedm.serialization import check_config, read_safetensors_header

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_MODELS = ("digits-ddpm",)  # diffusers models shipped in prunedm/assets
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# An image folder is decoded whole into memory: a bound per image (PIL's decompression-bomb guard
# warns only at 89M pixels) and on the total, so a crafted or mistaken folder fails fast and clearly.
MAX_IMAGE_PIXELS = 1 << 26
MAX_TOTAL_PIXELS = 1 << 32


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
        return load_diffusers(ASSETS / name)
    if spec.startswith("arch:"):
        name = spec.removeprefix("arch:")
        if name not in ARCHITECTURES:
            raise ConfigError(f"model={spec}: unknown architecture; built-in ones: {', '.join(ARCHITECTURES)}")
        return build(name, seed=seed)
    path = Path(spec)
    denoiser = pipeline_denoiser(path)
    if denoiser is not None:  # a pipeline dir: its unet/ or transformer/ (the other parts: prunedm.cli.pipeline)
        return load_diffusers(denoiser)
    if (path / "structure.json").is_file():
        from prunedm.serialization import load_pretrained

        return load_pretrained(path)
    if (path / "config.json").is_file():
        return load_diffusers(path)
    if path.exists():
        raise ConfigError(f"model={spec}: no model there (expected config.json from diffusers or structure.json)")
    return _load_from_hub_cache(spec)


def pipeline_denoiser(path: Path) -> Path | None:
    """The denoiser's dir of a diffusers pipeline dir (unet/ or transformer/ with a config.json), else None."""
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").is_file() and not (path / "config.json").is_file():
            return path / sub
    return None


def _diffusers_class(name, where: Path):
    diffusers = optional_import("diffusers", f"loading the diffusers model in {where}")

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    # Model classes only: a pipeline class would read model_index.json and could load code from the dir.
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ConfigError(f"{where}: _class_name {name!r} is not a diffusers model class")
    return cls


def _read_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{file} is not valid JSON (corrupt or truncated): {exc}") from exc
    check_config(config, file, "config.json")
    return config


def _weight_headers(path: Path) -> tuple[Path, dict]:
    """The safetensors weights of a diffusers model dir and their headers (a single file or shards)."""
    single, index = path / WEIGHTS_NAME, path / f"{WEIGHTS_NAME}.index.json"
    if single.is_file():
        return single, read_safetensors_header(single)
    if not index.is_file():
        raise ConfigError(f"{path}: no {WEIGHTS_NAME} (prunedm loads diffusers models from safetensors weights only)")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
    header = {}
    for shard in shards:
        file = path / str(shard)
        if Path(str(shard)).name != str(shard) or not file.is_file():
            raise ConfigError(f"{index} names shard {shard!r}, which is not a file in {path}")
        header.update(read_safetensors_header(file))
    return index, header


def _check_against_weights(cls, config: dict, path: Path) -> None:
    """Build the model the config describes on the meta device (no memory) and hold its tensor shapes
    against the weights' headers: config sizes that the weights do not back are refused before allocating."""
    config_file = path / "config.json"
    weights, header = _weight_headers(path)
    try:
        with torch.device("meta"):
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as exc:  # whatever the config makes the constructor raise is the config's fault
        raise ConfigError(f"{config_file}: a {cls.__name__} cannot be built from it: {_short(exc)}") from exc
    check_weights(model, config_file, weights, header)


def check_weights(model, config_file: Path, weights: Path, header: dict) -> None:
    """Hold the shapes of `model` (built on the meta device from config_file) against the weights' safetensors
    header: ConfigError when they differ, or when the config describes far more weights than the file holds."""
    numel = 0
    for key, tensor in model.state_dict().items():
        numel += tensor.numel()
        if key in header and header[key][1] != list(tensor.shape):
            raise ConfigError(
                f"{config_file} does not match {weights}: {key} is {list(tensor.shape)} by the config "
                f"but {header[key][1]} in the weights"
            )
    held = sum(math.prod(shape) for _, shape in header.values())
    if numel > 2 * held + 1_000_000:  # a few renamed or new tensors are diffusers' business; more is not
        raise ConfigError(f"{config_file} describes {numel} weights, but {weights} holds only {held}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def load_diffusers(path: Path):
    """The diffusers model in `path`: safetensors only, its config checked against the weights first."""
    config = _read_config(path / "config.json")
    cls = _diffusers_class(config.get("_class_name"), path / "config.json")
    _check_against_weights(cls, config, path)
    # Local files only, whatever config.json says (_name_or_path, a hub id): no request ever leaves.
    # low_cpu_mem_usage=False: the default asks for `accelerate` and prints an install hint when it is missing
    return cls.from_pretrained(path, low_cpu_mem_usage=False, local_files_only=True, use_safetensors=True)


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
    return load_diffusers(config_path.parent)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, sorted by path (the order training data is read in)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data={folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def folder_images(folder: Path, size: int, channels: int, files: list[Path] | None = None) -> torch.Tensor:
    """The images under `folder` (or its `files`), as [N, channels, size, size] in [-1, 1] (bicubic resize)."""
    import numpy as np
    from PIL import Image

    files = image_files(folder) if files is None else files
    if channels not in (1, 3):
        raise ConfigError(f"data={folder}: an image folder feeds models with 1 or 3 input channels, not {channels}")
    mode = "L" if channels == 1 else "RGB"
    arrays, total = [], 0
    for file in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    pixels = image.size[0] * image.size[1]
                    total += pixels
                    if pixels > MAX_IMAGE_PIXELS:
                        raise ConfigError(f"data={folder}: {file} is {image.size[0]}x{image.size[1]} pixels, "
                                          f"more than {MAX_IMAGE_PIXELS} (resize it first)")  # fmt: skip
                    if total > MAX_TOTAL_PIXELS:
                        raise ConfigError(f"data={folder}: the images hold more than {MAX_TOTAL_PIXELS} pixels in "
                                          f"all (at {file}); resize them to the model's size first")  # fmt: skip
                    image = image.convert(mode)
                    if image.size != (size, size):
                        image = image.resize((size, size), Image.Resampling.BICUBIC)
                    arrays.append(np.asarray(image, dtype=np.float32).reshape(size, size, channels))
        except ConfigError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ConfigError(f"data={folder}: {file} is not a readable image ({_short(exc)})") from exc
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (images / 127.5 - 1.0).clamp(-1, 1).contiguous()


def training_images(data: str, model, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] shaped for `model` (or `size` and `channels`, e.g. a VAE's input): data="digits"
    (shipped with scikit-learn), a folder of images (PNG/JPG/..., resized to the model's sample_size; the
    real-scale path, e.g. CIFAR-10 as PNGs), or a .safetensors file whose "images" tensor is [N, C, H, W]."""
    config = model.config
    size, channels = size or config.sample_size, channels or config.in_channels
    if data == "digits":
        from prunedm.data import DigitsDataset

        images = DigitsDataset("train", size=size).images
        return images.expand(-1, channels, -1, -1).contiguous()
    path = Path(data)
    if path.is_dir():
        return folder_images(path, size, channels)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(
            f"data={data}: expected 'digits', a folder of images, "
            "or an existing .safetensors file with an 'images' tensor"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_safetensors_header(path)  # checked before loading: a truncated or forged file stops here
    dtype, shape = header.get("images", (None, []))
    if len(shape) != 4 or shape[1] != channels or 0 in shape:
        raise ConfigError(f"data={data}: needs a non-empty 'images' tensor [N, {channels}, H, W], got {shape or None}")
    if dtype not in ("F16", "BF16", "F32", "F64"):
        raise ConfigError(f"data={data}: 'images' must hold floats in [-1, 1], got dtype {dtype}")
    try:
        images = load_file(str(path))["images"]
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"data={data}: not a readable safetensors file ({_short(exc)})") from exc
    return images.float()
