"""CIFAR-10-C style corruptions (Hendrycks & Dietterich, ICLR 2019) for grayscale images in [0, 1].

Ten of the benchmark's corruptions, each with five severities, re-implemented with numpy, scipy and
PIL on batches ``(N, H, W)``. Parameters are those of the CIFAR-10-C recipe (``make_cifar_c.py``),
which was written for 32x32 images and so fits 28x28 Fashion-MNIST; the deviations are:

* ``brightness`` adds to the pixel value directly (for a grey pixel the HSV value *is* the pixel);
* ``motion_blur`` replaces ImageMagick's motion blur by its kernel (one-sided Gaussian weights along
  a random direction in [-45, 45] degrees, radius 10-12 pixels, cut at 4 sigma), on the pixel grid;
* ``defocus_blur`` and ``elastic_transform`` use mirror borders and bilinear sampling in place of
  OpenCV's; ``elastic_transform`` scales with the image size and its parameters are re-chosen so that
  the distortion grows with severity (CIFAR-10-C's level 1 warps more than its level 5).

:func:`corrupt` is deterministic: its randomness comes from a local generator seeded with
``(seed, corruption index, severity)``, so one corruption's output does not depend on which others
were generated. Difficulty presets map to severities through :data:`LEVELS`.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from fwdgrad.data.errors import check_choice

LEVELS = {"easy": 1, "medium": 3, "hard": 5}
RECIPE_VERSION = 1  # bump when a recipe changes, so cached benchmarks made by older code are not reused


def resolve_severity(severity: int | str) -> int:
    """Map a severity 1-5 or a preset name (``easy``/``medium``/``hard``) to a severity 1-5."""
    if isinstance(severity, str) and severity in LEVELS:
        return LEVELS[severity]
    if isinstance(severity, int) and not isinstance(severity, bool) and 1 <= severity <= 5:
        return severity
    raise ValueError(f"severity must be an integer in [1, 5] or one of {', '.join(LEVELS)}, got {severity!r}")


def _mirror(index: np.ndarray, size: int) -> np.ndarray:
    """Reflect integer indices into ``[0, size)`` without repeating the edge pixel (OpenCV's REFLECT_101).

    One reflection on each side is exact; indices further out are clamped first.
    """
    table = np.concatenate([np.arange(size - 1, 0, -1), np.arange(size), np.arange(size - 2, -1, -1)])
    return table[np.clip(index, -(size - 1), 2 * size - 2) + size - 1]


def _bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``images`` (N,H,W) at fractional coordinates ``rows``/``cols`` (N,H,W), mirror borders."""
    n, h, w = images.shape
    flat = images.reshape(n, h * w)
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0).reshape(n, -1), (cols - c0).reshape(n, -1)
    r0, c0 = r0.astype(np.int64).reshape(n, -1), c0.astype(np.int64).reshape(n, -1)
    r_lo, r_hi = _mirror(r0, h) * w, _mirror(r0 + 1, h) * w
    c_lo, c_hi = _mirror(c0, w), _mirror(c0 + 1, w)

    def at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.take_along_axis(flat, r + c, axis=1)

    top = at(r_lo, c_lo) * (1 - fc) + at(r_lo, c_hi) * fc
    bottom = at(r_hi, c_lo) * (1 - fc) + at(r_hi, c_hi) * fc
    return (top * (1 - fr) + bottom * fr).reshape(n, h, w)


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return x + rng.normal(scale=c, size=x.shape)


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [500, 250, 100, 75, 50][severity - 1]
    return rng.poisson(x * c) / c


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    kernel = ndimage.gaussian_filter(disk / disk.sum(), alias_blur, mode="mirror", radius=1)
    return ndimage.correlate(x, kernel[None], mode="mirror")


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)][severity - 1]
    angle = np.deg2rad(rng.uniform(-45, 45, size=len(x)))[:, None]
    # one-sided Gaussian weights along the blur direction, cut at the radius or at 4 sigma
    steps = np.arange(min(2 * radius + 1, int(np.ceil(4 * sigma)) + 1))
    weights = np.exp(-(steps**2) / (2 * sigma**2))
    weights /= weights.sum()
    n, h, w = x.shape
    flat = x.reshape(n, h * w)
    rows, cols = (g.reshape(1, -1) for g in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    out = np.zeros_like(flat)
    for step, weight in zip(steps, weights):
        r = np.clip(rows + np.round(step * np.sin(angle)).astype(np.int64), 0, h - 1)
        c = np.clip(cols + np.round(step * np.cos(angle)).astype(np.int64), 0, w - 1)
        out += weight * np.take_along_axis(flat, r * w + c, axis=1)
    return out.reshape(n, h, w)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return x + [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[1:]
    small = (int(w * c), int(h * c))
    out = [
        np.asarray(Image.fromarray(img.astype(np.float32)).resize(small, Image.BOX).resize((w, h), Image.BOX))
        for img in x
    ]
    return np.stack(out).astype(x.dtype)


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = [80, 65, 58, 50, 40][severity - 1]
    out = []
    for img in np.round(np.clip(x, 0, 1) * 255).astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(img, mode="L").save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer)))
    return np.stack(out).astype(x.dtype) / 255.0


def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # (displacement amplitude, displacement smoothness, affine jitter) as fractions of the image size
    alpha, sigma, affine = [
        (0.0, 0.0, 0.02),
        (0.04, 0.06, 0.03),
        (0.07, 0.06, 0.04),
        (0.1, 0.05, 0.05),
        (0.13, 0.05, 0.06),
    ][severity - 1]
    n, h, w = x.shape
    size = min(h, w)
    # random affine warp: move three anchor points by up to `affine` pixels (as in CIFAR-10-C)
    centre = np.array([w // 2, h // 2], dtype=np.float64)
    half = size // 3
    src = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + rng.uniform(-affine * size, affine * size, size=(n, 3, 2))
    # inverse map dst -> src, so that each output pixel knows where to read from
    inverse = np.linalg.solve(
        np.concatenate([dst, np.ones((n, 3, 1))], axis=2), np.broadcast_to(src, (n, 3, 2))
    )
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    a = inverse[:, :, :, None, None]  # (N, 3, 2, 1, 1): rows of [x, y, 1] -> (source x, source y)
    source_x = a[:, 0, 0] * cols + a[:, 1, 0] * rows + a[:, 2, 0]
    source_y = a[:, 0, 1] * cols + a[:, 1, 1] * rows + a[:, 2, 1]
    warped = _bilinear(x, source_y, source_x)
    if alpha == 0:
        return warped
    # smooth random displacement field (Simard et al. 2003)
    field = rng.uniform(-1, 1, size=(2, n, h, w))
    dy, dx = (
        ndimage.gaussian_filter(f, (0, sigma * size, sigma * size), mode="reflect", truncate=3) for f in field
    )
    scale = alpha * size / max(np.abs(dx).max(), np.abs(dy).max(), 1e-12)
    return _bilinear(warped, rows + dy * scale, cols + dx * scale)


CORRUPTION_FNS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "elastic_transform": elastic_transform,
}
CORRUPTIONS = tuple(CORRUPTION_FNS)


def corrupt(images: np.ndarray, corruption: str, severity: int | str, seed: int) -> np.ndarray:
    """Apply one corruption to grayscale images (N,H,W) in [0, 1]; returns float32 (N,H,W) in [0, 1].

    ``severity`` is 1-5 or a preset from :data:`LEVELS`. The result depends only on the images,
    ``corruption``, ``severity`` and ``seed``; the same arguments give identical bytes.
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    severity = resolve_severity(severity)
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {x.shape}")
    rng = np.random.default_rng([seed, CORRUPTIONS.index(corruption), severity])
    return np.clip(CORRUPTION_FNS[corruption](x, severity, rng), 0.0, 1.0).astype(np.float32)
