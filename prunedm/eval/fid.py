"""FID of generated images against a reference set, through clean-fid: offline with the shipped digits
classifier's 64-d features, or standard Inception FID with weights from a local directory.

Both sides go to PNG files (uint8, as clean-fid reads them) and through cleanfid.fid.compute_fid in
mode "clean"; with the classifier nothing is resized to 299 (images keep, or are resized to, the
classifier's input size), so a 16x16 digit is judged by a network trained on 16x16 digits."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIER_DIR = ASSETS / "digits-classifier"
FEATURES = ("digits-classifier", "inception")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# An unconditional sample counts as a recognisable digit when the classifier's top-1 probability is this high.
CONFIDENT_PROBABILITY = 0.9
_RANGE_SLACK = 1e-3  # samplers clamp to [-1, 1]; allow float round-off around it

_classifier_cache: dict[str, nn.Module] = {}


def load_digits_classifier():
    """The shipped DigitsClassifier (prunedm/assets/digits-classifier), loaded once and kept in eval mode."""
    from prunedm.eval.classifier import DigitsClassifier

    key = str(CLASSIFIER_DIR)
    if key not in _classifier_cache:
        if not (CLASSIFIER_DIR / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the digits classifier is missing from {CLASSIFIER_DIR}; make it with "
                "`python scripts/train_digits_models.py`"
            )
        _classifier_cache[key] = DigitsClassifier.load(CLASSIFIER_DIR)
    return _classifier_cache[key]


class ClassifierFeatures(nn.Module):
    """clean-fid's feature-extractor contract around DigitsClassifier.features: a batch [N, 3, H, W]
    of floats in 0..255 (clean-fid's RGB) -> [N, 64]; channels are averaged back to the gray image."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        gray = batch.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        return self.classifier.features(gray)


def _resize_to(size: int):
    """custom_fn_resize for clean-fid: HxWx3 uint8 -> size x size x 3 float32 in 0..255. Images already
    at `size` pass unchanged (no resampling); others are resized per channel with PIL bicubic in float,
    as clean-fid's own "clean" resizer does."""
    from PIL import Image

    def resize(image: np.ndarray) -> np.ndarray:
        if image.shape[0] == size and image.shape[1] == size:
            return image.astype(np.float32)
        channels = [
            np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
            for c in range(image.shape[2])
        ]
        return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)

    return resize


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor):
        kind = type(images).__name__
        raise TypeError(f"{name} must be a tensor [N, C, H, W] in [-1, 1] or a folder path, got {kind}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images for a covariance, got {images.shape[0]}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor in [-1, 1], got {images.dtype}")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < -1 - _RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueError(f"{name} must lie in [-1, 1] (as sample_images returns), got [{low:.3g}, {high:.3g}]")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _check_folder(folder, name: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{name}: {folder} is not a directory of images")
    count = len(_image_files(folder))
    if count < 2:
        raise ValueError(f"{name}: {folder} holds {count} PNG/JPG image(s); FID needs at least 2")
    return folder


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], [N, C, H, W] -> uint8 [N, H, W, C], the pixels a PNG of them holds."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def write_png_folder(images: torch.Tensor, folder: str | Path) -> Path:
    """Write images in [-1, 1] as PNGs 000000.png, 000001.png, ... into folder (gray for C = 1)."""
    from PIL import Image

    _check_images(images, "images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(to_uint8(images)):
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(folder / f"{i:06d}.png")
    return folder


def load_image_folder(folder: str | Path, size: int | None = None) -> torch.Tensor:
    """The PNG/JPG images of a folder (recursively, sorted by path) as gray [N, 1, H, W] in [-1, 1],
    resized to size x size when given (PIL bicubic in float, as for FID)."""
    from PIL import Image

    folder = _check_folder(folder, "folder")
    arrays = []
    for path in _image_files(folder):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        if size is not None:
            rgb = _resize_to(size)(rgb)
        arrays.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32)).mean(dim=2))
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"folder: {folder} holds images of several sizes {sorted(shapes)}; pass size=")
    return (torch.stack(arrays).unsqueeze(1) / 127.5 - 1.0).clamp(-1, 1)


def _digits_reference(size: int) -> torch.Tensor:
    from prunedm.data import DigitsDataset

    return DigitsDataset("all", size=size).images


def _image_size(images) -> int:
    if isinstance(images, torch.Tensor):
        return int(images.shape[-1])
    from PIL import Image

    with Image.open(_image_files(Path(images))[0]) as first:
        return int(first.size[0])


def _as_folder(images, name: str, workdir: Path) -> str:
    if isinstance(images, (str, Path)):
        return str(_check_folder(images, name))
    _check_images(images, name)
    return str(write_png_folder(images, workdir / name))


def _inception_model(inception_dir, device: torch.device) -> nn.Module:
    if inception_dir is None:
        raise ValueError(
            f'features="inception" needs inception_dir: a directory holding clean-fid\'s {INCEPTION_FILE} '
            f"(download it where there is internet: {INCEPTION_URL})"
        )
    path = Path(inception_dir) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: FID with features='inception' never downloads. Fetch it where there is internet "
            f"(`curl -L -o {path.name} {INCEPTION_URL}`) and put it in {Path(inception_dir)}"
        )
    from cleanfid.inception_torchscript import InceptionV3W

    return InceptionV3W(str(Path(inception_dir)), download=False).to(device).eval()


def compute_fid(images, reference, *, features="digits-classifier", inception_dir=None, batch_size=64) -> float:
    """Frechet distance between the feature statistics of `images` and `reference`, through clean-fid.

    images / reference: float tensors [N, C, H, W] in [-1, 1] (what sample_images returns), folders of
    PNG/JPG images, or (reference only) "digits": the digits dataset at the images' resolution.
    features: "digits-classifier" (default; the shipped classifier's 64-d penultimate features, images
    resized to its 16x16 input only when they differ) or "inception" (standard clean-fid FID, 2048-d
    Inception features, the weights read from inception_dir/inception-2015-12-05.pt; nothing is
    downloaded). Tensors are quantized to uint8 PNGs first, exactly as a folder of samples would be."""
    from cleanfid import fid as cleanfid_fid

    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(images, torch.Tensor):
        _check_images(images, "images")
    else:
        images = _as_path(images)
    if isinstance(reference, str) and reference == "digits":
        reference = _digits_reference(_image_size(images))
    elif not isinstance(reference, (torch.Tensor, str, Path)):
        raise TypeError(f'reference must be "digits", a tensor or a folder path, got {type(reference).__name__}')
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if features == "inception":
        extractor, resize = _inception_model(inception_dir, device), None
    else:
        classifier = load_digits_classifier()
        extractor, resize = ClassifierFeatures(classifier).to(device).eval(), _resize_to(classifier.config["size"])
    with tempfile.TemporaryDirectory(prefix="prunedm-fid-") as tmp:
        workdir = Path(tmp)
        fdir1 = _as_folder(images, "images", workdir)
        fdir2 = _as_folder(reference, "reference", workdir)
        score = cleanfid_fid.compute_fid(
            fdir1=fdir1, fdir2=fdir2, mode="clean", custom_feat_extractor=extractor, custom_fn_resize=resize,
            num_workers=0, batch_size=batch_size, device=device, verbose=False, use_dataparallel=False,
        )  # fmt: skip
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"FID is not finite ({score}); too few or degenerate images?")
    return max(score, 0.0)  # sqrtm round-off can leave a tiny negative value for identical sets


def _as_path(images) -> Path:
    if not isinstance(images, (str, Path)):
        kind = type(images).__name__
        raise TypeError(f"images must be a tensor [N, C, H, W] in [-1, 1] or a folder path, got {kind}")
    return _check_folder(images, "images")


@torch.no_grad()
def classifier_statistics(images: torch.Tensor) -> dict:
    """The digits classifier's verdict on images in [-1, 1] (gray or RGB, any size; resized to its input):
    classifier_accuracy = fraction of samples whose top-1 probability is >= CONFIDENT_PROBABILITY (0.9), i.e.
    recognisably some digit (unconditional samples have no label to be right about); class_entropy =
    entropy in nats of the histogram of predicted classes (ln 10 = 2.303 when all ten are equally frequent)."""
    _check_images(images, "images")
    classifier = load_digits_classifier()
    size = classifier.config["size"]
    gray = images.float().cpu().mean(dim=1, keepdim=True)
    if gray.shape[-1] != size or gray.shape[-2] != size:
        gray = torch.nn.functional.interpolate(gray, size=(size, size), mode="bicubic", align_corners=False)
        gray = gray.clamp(-1, 1)
    device = next(classifier.parameters()).device
    probabilities = torch.cat([torch.softmax(classifier(chunk.to(device)), dim=1).cpu() for chunk in gray.split(256)])
    confident = (probabilities.max(dim=1).values >= CONFIDENT_PROBABILITY).float().mean()
    counts = torch.bincount(probabilities.argmax(dim=1), minlength=10).double()
    frequencies = counts[counts > 0] / counts.sum()
    entropy = float(-(frequencies * frequencies.log()).sum())
    return {"classifier_accuracy": float(confident), "class_entropy": entropy}


def evaluate_samples(images, reference="digits", *, features="digits-classifier", inception_dir=None) -> dict:
    """FID of images against reference (see compute_fid) plus the classifier's judgement of the samples
    (see classifier_statistics): {"fid", "classifier_accuracy", "class_entropy", "num_samples", "features"}."""
    if isinstance(images, (str, Path)):
        loaded = load_image_folder(_as_path(images), size=load_digits_classifier().config["size"])
    else:
        _check_images(images, "images")
        loaded = images
    fid = compute_fid(images, reference, features=features, inception_dir=inception_dir)
    return {"fid": fid, **classifier_statistics(loaded), "num_samples": int(loaded.shape[0]), "features": features}


__all__ = [
    "CONFIDENT_PROBABILITY",
    "ClassifierFeatures",
    "classifier_statistics",
    "compute_fid",
    "evaluate_samples",
    "load_digits_classifier",
    "load_image_folder",
    "write_png_folder",
]
