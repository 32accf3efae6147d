"""The "-C" out-of-distribution benchmarks: CIFAR-10-C as published and Fashion-MNIST-C generated here.

CIFAR-10-C (Hendrycks & Dietterich 2019) is read from its released layout
``<root>/CIFAR-10-C/<corruption>.npy``: uint8 (50000, 32, 32, 3), severities 1-5 stacked in blocks of
10,000 images (the CIFAR-10 test set, in order), with ``labels.npy`` (50000,) alongside.

Fashion-MNIST-C is generated from the 10,000 Fashion-MNIST test images with the recipes in
:mod:`fwdgrad.data.corruptions` and cached, one file per corruption and severity, as
``<root>/FashionMNIST-C/v<recipe version>-seed<seed>/<corruption>_s<severity>.npy`` uint8
(10000, 28, 28) plus ``labels.npy``. The ``seed`` fixes the benchmark (like the released CIFAR-10-C
files); a run's own seed only changes the adaptation/test split (:func:`adaptation_split`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fwdgrad.data.corruptions import CORRUPTIONS, RECIPE_VERSION, corrupt, resolve_severity
from fwdgrad.data.errors import check_choice, require_files
from fwdgrad.data.fashion import DEBIAN_FASHION_DIR, load_fashion_mnist
from fwdgrad.data.splits import stratified_split

CIFAR10_C_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
CIFAR10_C_EXTRA = ("gaussian_blur", "saturate", "spatter", "speckle_noise")
_CIFAR10_C_HOW = (
    "download CIFAR-10-C.tar from https://zenodo.org/records/2535967 and extract it into the root"
)


def resolve_corruptions(
    corruption: str | Sequence[str], allowed: Sequence[str], default: Sequence[str]
) -> list[str]:
    """Expand ``"all"`` to ``default`` and check every name against ``allowed``."""
    names = (
        list(default)
        if corruption == "all"
        else [corruption]
        if isinstance(corruption, str)
        else list(corruption)
    )
    if not names:
        raise ValueError(f"corruption list is empty; allowed: all, {', '.join(allowed)}")
    for name in names:
        check_choice("corruption", name, ["all", *allowed])
    return names


def load_cifar10_c(
    root: str | Path, corruption: str | Sequence[str] = "all", severity: int | str = "hard"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10-C images at one severity: uint8 (M*10000, 32, 32, 3), labels (M*10000,) and base index.

    ``corruption`` is a name, a list of names, or ``"all"`` (the 15 benchmark corruptions; the 4 extra
    ones can be named). The third array is each image's index in the clean test set, shared by all
    corruptions, so splits can keep the corrupted versions of one test image together.
    """
    names = resolve_corruptions(corruption, CIFAR10_C_CORRUPTIONS + CIFAR10_C_EXTRA, CIFAR10_C_CORRUPTIONS)
    severity = resolve_severity(severity)
    folder = Path(root) / "CIFAR-10-C"
    require_files(
        "CIFAR-10-C", [folder / "labels.npy", *(folder / f"{n}.npy" for n in names)], _CIFAR10_C_HOW
    )
    labels = np.load(folder / "labels.npy")
    per_severity = len(labels) // 5
    rows = slice((severity - 1) * per_severity, severity * per_severity)
    images = np.concatenate([np.load(folder / f"{n}.npy", mmap_mode="r")[rows] for n in names])
    base = np.tile(np.arange(per_severity), len(names))
    return images, np.tile(labels[rows], len(names)).astype(np.int64), base


def make_fashion_mnist_c(
    root: str | Path,
    corruption: str | Sequence[str] = "all",
    severity: int | str = "hard",
    seed: int = 0,
    source: str | Path = DEBIAN_FASHION_DIR,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST-C at one severity: uint8 (M*10000, 28, 28), labels and base index (see above).

    Missing ``(corruption, severity)`` files are generated from the Fashion-MNIST test set and cached;
    ``"all"`` means the ten corruptions of :data:`fwdgrad.data.corruptions.CORRUPTIONS`.
    """
    names = resolve_corruptions(corruption, CORRUPTIONS, CORRUPTIONS)
    severity = resolve_severity(severity)
    folder = Path(root) / "FashionMNIST-C" / f"v{RECIPE_VERSION}-seed{seed}"
    clean = None
    if (
        not all((folder / f"{n}_s{severity}.npy").is_file() for n in names)
        or not (folder / "labels.npy").is_file()
    ):
        images, labels = load_fashion_mnist(root, train=False, source=source, download=download)
        clean = images[:, 0].numpy()
        folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(folder / "labels.npy", labels.numpy().astype(np.int64))
    for name in names:
        path = folder / f"{name}_s{severity}.npy"
        if not path.is_file():
            _save_atomic(path, np.round(corrupt(clean, name, severity, seed) * 255).astype(np.uint8))
    labels = np.load(folder / "labels.npy")
    images = np.concatenate([np.load(folder / f"{n}_s{severity}.npy") for n in names])
    return images, np.tile(labels, len(names)), np.tile(np.arange(len(labels)), len(names))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name and rename, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def adaptation_split(
    labels: np.ndarray, base: np.ndarray, adapt_fraction: float = 0.9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (adapt, test) row indices of a -C set: ``adapt_fraction`` of the clean test images adapt.

    The split is drawn over the clean base images (stratified by class), so every corrupted copy of a
    base image lands on the same side and no test image is seen, differently corrupted, in adaptation.
    """
    n_base = int(base.max()) + 1
    base_labels = np.zeros(n_base, dtype=np.int64)
    base_labels[base] = labels
    _, test_base = stratified_split(base_labels, 1.0 - adapt_fraction, seed)
    is_test = np.isin(base, test_base)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
