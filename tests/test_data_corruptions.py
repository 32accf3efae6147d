"""The CIFAR-10-C-style corruption generator for grayscale images."""

import numpy as np
import pytest

from fwdgrad.data import CORRUPTIONS, LEVELS, corrupt, resolve_severity
from fwdgrad.data.corruptions import _mirror

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "elastic_transform"}


@pytest.fixture(scope="module")
def images():
    """Smooth blobs plus texture: structure every corruption can visibly change."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    out = []
    for _ in range(16):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(4, 9)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        out.append(np.clip(0.1 + 0.7 * blob + 0.15 * ((xx // 3 + yy // 3) % 2), 0, 1))
    return np.stack(out)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_deterministic_changes_the_image_and_grows_with_severity(images, name):
    first = corrupt(images, name, 3, seed=7)
    again = corrupt(images, name, 3, seed=7)
    assert first.dtype == np.float32 and first.shape == images.shape
    assert first.tobytes() == again.tobytes()
    assert 0.0 <= first.min() and first.max() <= 1.0
    distortion = [np.abs(corrupt(images, name, s, seed=7) - images).mean() for s in (1, 5)]
    assert distortion[0] > 1e-3
    assert distortion[1] > distortion[0]
    if name in RANDOM:
        assert corrupt(images, name, 3, seed=8).tobytes() != first.tobytes()


def test_levels_map_to_severities():
    assert LEVELS == {"easy": 1, "medium": 3, "hard": 5}
    assert corrupt(np.full((1, 8, 8), 0.5), "brightness", "hard", 0).tobytes() == (
        corrupt(np.full((1, 8, 8), 0.5), "brightness", 5, 0).tobytes()
    )


@pytest.mark.parametrize("bad", [0, 6, 2.5, "extreme", True])
def test_bad_severity_is_a_value_error(bad):
    with pytest.raises(ValueError, match="severity"):
        resolve_severity(bad)


def test_unknown_corruption_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown corruption 'fog'.*gaussian_noise"):
        corrupt(np.zeros((1, 8, 8)), "fog", 1, 0)


def test_mirror_reflects_without_repeating_the_edge():
    assert _mirror(np.array([-2, -1, 0, 4, 5, 6]), 5).tolist() == [2, 1, 0, 4, 3, 2]
