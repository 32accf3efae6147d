"""Fashion-MNIST through ``torchvision.datasets.FashionMNIST`` from a local root.

torchvision 0.28 reads the *uncompressed* IDX files ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,
labels-idx1}-ubyte`` and only checks that they exist (its md5 list is used for downloads alone). Offline,
:func:`prepare_fashion_mnist` fills that layout by gunzipping the original IDX files that Debian's
``dataset-fashion-mnist`` package installs in ``/usr/share/datasets/fashion-mnist``; online,
``download=True`` lets torchvision fetch them.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST

from fwdgrad.data.errors import DatasetNotFound
from fwdgrad.data.images import to_float_images

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = tuple(FashionMNIST.classes)
_RAW_FILES = tuple(os.path.splitext(name)[0] for name, _ in FashionMNIST.resources)
_HOW_TO_GET = (
    f"run `apt-get install dataset-fashion-mnist` (fills {DEBIAN_FASHION_DIR}) or pass download=True"
)


def prepare_fashion_mnist(
    root: str | Path, source: str | Path = DEBIAN_FASHION_DIR, download: bool = False
) -> Path:
    """Make sure ``<root>/FashionMNIST/raw/`` holds the four uncompressed IDX files; return that folder.

    Missing files are gunzipped from ``source`` (``*.gz``, as Debian ships them) or taken uncompressed
    from it; failing that, ``download=True`` asks torchvision to download them. Otherwise raises
    :class:`DatasetNotFound`.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    missing = [name for name in _RAW_FILES if not (raw / name).is_file()]
    source = Path(source)
    if missing and all((source / f"{n}.gz").is_file() or (source / n).is_file() for n in missing):
        raw.mkdir(parents=True, exist_ok=True)
        for name in missing:
            _copy_idx(source, name, raw / name)
    elif missing and download:
        FashionMNIST(str(root), train=True, download=True)
    elif missing:
        raise DatasetNotFound("Fashion-MNIST", raw / missing[0], _HOW_TO_GET)
    return raw


def _copy_idx(source: Path, name: str, dest: Path) -> None:
    """Copy ``source/name`` (gunzipping ``source/name.gz`` if that is what exists) to ``dest`` atomically."""
    tmp = dest.with_name(dest.name + ".tmp")
    gz = source / f"{name}.gz"
    opener = gzip.open(gz, "rb") if gz.is_file() else open(source / name, "rb")
    with opener as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, dest)


def load_fashion_mnist(
    root: str | Path,
    train: bool,
    size: int | None = None,
    source: str | Path = DEBIAN_FASHION_DIR,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Fashion-MNIST split as float32 images (N,1,28,28) in [0, 1] and int64 labels."""
    prepare_fashion_mnist(root, source, download)
    ds = FashionMNIST(str(root), train=train)
    return to_float_images(ds.data.numpy(), size=size), ds.targets.to(torch.int64)
