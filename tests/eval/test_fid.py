"""FID through clean-fid on the digits classifier's features: sanity of the numbers, equality with a direct
Frechet distance of the same features, folder == tensor input, and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from prunedm.data import DigitsDataset
from prunedm.eval.fid import (
    classifier_statistics,
    compute_fid,
    evaluate_samples,
    load_digits_classifier,
    to_uint8,
    write_png_folder,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return DigitsDataset("all", size=16).images


def noise(n: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def direct_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance of the classifier features of the PNG pixels, without clean-fid."""
    classifier = load_digits_classifier()

    def features(images):
        pixels = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return classifier.features(pixels / 127.5 - 1).double().numpy()

    fa, fb = features(a), features(b)
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_of_a_set_with_itself_is_zero(digits):
    assert compute_fid(digits[:300], digits[:300]) == pytest.approx(0.0, abs=1e-3)


def test_real_vs_real_is_small_and_real_vs_noise_is_large(digits):
    real = compute_fid(digits[:400], digits[400:800])
    fake = compute_fid(noise(400), digits[400:800])
    assert 0 < real < 50 and fake > 20 * real


def test_clean_fid_path_equals_a_direct_frechet_distance(digits):
    a, b = digits[:300], 0.8 * digits[300:600] + 0.1 * noise(300, seed=1)
    assert compute_fid(a, b) == pytest.approx(direct_fid(a, b), rel=1e-4, abs=1e-4)


def test_folder_input_equals_tensor_input(digits, tmp_path):
    samples = (digits[:150] + 0.2 * noise(150, seed=2)).clamp(-1, 1)
    folder = write_png_folder(samples, tmp_path / "samples")
    reference = write_png_folder(digits[800:1000], tmp_path / "reference")
    from_tensors = compute_fid(samples, digits[800:1000])
    assert compute_fid(folder, reference) == pytest.approx(from_tensors, rel=1e-6)
    assert compute_fid(str(folder), digits[800:1000]) == pytest.approx(from_tensors, rel=1e-6)
    by_folder, by_tensor = evaluate_samples(folder), evaluate_samples(samples)
    assert by_folder.pop("features") == by_tensor.pop("features") == "digits-classifier"
    assert by_folder == pytest.approx(by_tensor, rel=1e-5)


def test_rgb_and_other_sizes_are_accepted(digits):
    rgb = digits[:200].expand(-1, 3, -1, -1)
    assert compute_fid(rgb, digits[:200]) == pytest.approx(0.0, abs=1e-3)  # gray in RGB: same pixels
    big = torch.nn.functional.interpolate(digits[:200], size=(24, 24), mode="bilinear").clamp(-1, 1)
    assert 0 <= compute_fid(big, "digits") < 100  # reference digits made at 24x24, both resized to 16


def test_evaluate_samples_fields_and_classifier_statistics(digits):
    result = evaluate_samples(digits[:300])
    assert set(result) == {"fid", "classifier_accuracy", "class_entropy", "num_samples", "features"}
    assert result["num_samples"] == 300 and result["features"] == "digits-classifier"
    assert result["fid"] < 20 and result["classifier_accuracy"] > 0.9
    assert result["class_entropy"] == pytest.approx(math.log(10), abs=0.05)  # real digits: all ten classes
    ones = digits[DigitsDataset("all").labels == 1][:50]
    assert classifier_statistics(ones)["class_entropy"] < 0.3  # a single class
    assert classifier_statistics(noise(300))["classifier_accuracy"] < 0.5


def test_bad_inputs_raise(digits, tmp_path):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        compute_fid(digits[0], digits)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        compute_fid(torch.zeros(4, 2, 16, 16), digits)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        compute_fid(digits[:10] * 3, digits)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        compute_fid(digits[:10], (digits[:10] + 1) * 127.5)  # 0..255 pixels are not accepted
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid(digits[:1], digits)
    with pytest.raises(TypeError, match="floating"):
        compute_fid(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), digits)
    with pytest.raises(ValueError, match="features"):
        compute_fid(digits[:10], digits, features="clip")
    with pytest.raises(ValueError, match="not a directory"):
        compute_fid(tmp_path / "nowhere", digits)
    with pytest.raises(TypeError, match="reference"):
        compute_fid(digits[:10], 3)


def test_inception_needs_a_local_weights_file(digits, tmp_path):
    with pytest.raises(ValueError, match="inception_dir"):
        compute_fid(digits[:10], digits[:10], features="inception")
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt.*never downloads.*curl"):
        compute_fid(digits[:10], digits[:10], features="inception", inception_dir=tmp_path)
