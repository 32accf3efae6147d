"""Real vision datasets through torchvision: CIFAR-10/100, SVHN and Omniglot, as float tensors.

On-disk layouts (those torchvision creates with ``download=True``)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   pickled batches
    <root>/cifar-100-python/{train, test, meta}
    <root>/svhn/{train_32x32.mat, test_32x32.mat}                             (torchvision's SVHN root)
    <root>/omniglot-py/images_{background,evaluation}/<alphabet>/<character>/*.png (+ the two .zip files)

torchvision checks these files against its published md5 sums and answers a mismatch with "not found
or corrupted". Here the checks are split: a missing file raises :class:`DatasetNotFound` naming it,
``verify=True`` (the default) compares md5 sums and raises :class:`DatasetCorrupted`, and the data are
then read through small subclasses whose own integrity test only reports presence. ``verify=False``
reads self-made copies in the same layout (the test fixtures; an Omniglot tree without its zips).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, SVHN, Omniglot
from torchvision.datasets.utils import check_integrity

from fwdgrad.data.errors import DatasetCorrupted, require_files
from fwdgrad.data.images import to_float_images


class _CIFAR10(CIFAR10):
    meta = {**CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:
        return True


class _CIFAR100(CIFAR100):
    meta = {**CIFAR100.meta, "md5": None}

    def _check_integrity(self) -> bool:
        return True


class _SVHN(SVHN):
    def _check_integrity(self) -> bool:
        return True


class _Omniglot(Omniglot):
    def _check_integrity(self) -> bool:
        return True


def _verify(name: str, files: list[tuple[Path, str]], how: str) -> None:
    for path, md5 in files:
        if not check_integrity(str(path), md5):
            raise DatasetCorrupted(name, path, how)


def load_cifar(
    root: str | Path,
    train: bool,
    hundred: bool = False,
    size: int | None = None,
    verify: bool = True,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """CIFAR-10 (or CIFAR-100, fine labels): float32 (N,3,32,32) in [0, 1], int64 labels, class names."""
    official, reader = (CIFAR100, _CIFAR100) if hundred else (CIFAR10, _CIFAR10)
    name = official.__name__.replace("CIFAR", "CIFAR-")
    if download:
        official(str(root), train=train, download=True)
    folder = Path(root) / official.base_folder
    listed = official.train_list + official.test_list + [[official.meta["filename"], official.meta["md5"]]]
    files = [(folder / filename, md5) for filename, md5 in listed]
    how = f"pass download=True or extract {official.filename} ({official.url}) into {root}"
    require_files(name, [path for path, _ in files], how)
    if verify:
        _verify(name, files, how + "; verify=False accepts a self-made copy")
    ds = reader(str(root), train=train)
    images = to_float_images(ds.data, size=size, channels_last=True)
    return images, torch.as_tensor(ds.targets, dtype=torch.int64), tuple(ds.classes)


def load_svhn(
    root: str | Path, train: bool, size: int | None = None, verify: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN (cropped digits) split as float32 (N,3,32,32) in [0, 1] and int64 labels 0-9."""
    split = "train" if train else "test"
    folder = Path(root) / "svhn"
    if download:
        SVHN(str(folder), split=split, download=True)
    url, filename, md5 = SVHN.split_list[split]
    how = f"pass download=True or put {url} in {folder}"
    require_files("SVHN", [folder / filename], how)
    if verify:
        _verify("SVHN", [(folder / filename, md5)], how + "; verify=False accepts a self-made copy")
    ds = _SVHN(str(folder), split=split)
    return to_float_images(ds.data, size=size), torch.as_tensor(ds.labels, dtype=torch.int64)


def load_omniglot(
    root: str | Path, background: bool, size: int = 28, verify: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """One Omniglot set (background = 964 training characters, evaluation = 659 novel ones).

    Returns float32 (N,1,size,size) in [0, 1] (strokes dark on white, as drawn), int64 labels and the
    class names ``alphabet/character``. Classes and images are sorted by name, so labels do not depend
    on the order in which the file system lists folders (torchvision's own indices do).
    """
    folder = Path(root) / Omniglot.folder
    if download:
        Omniglot(str(root), background=background, download=True)
    target = "images_background" if background else "images_evaluation"
    how = f"pass download=True or extract {Omniglot.download_url_prefix}/{target}.zip into {folder}"
    require_files("Omniglot", [folder / target], how)
    if verify:
        zip_path = folder / f"{target}.zip"
        require_files("Omniglot", [zip_path], how + "; verify=False reads the extracted tree alone")
        _verify("Omniglot", [(zip_path, Omniglot.zips_md5[target])], how)
    ds = _Omniglot(str(root), background=background)
    characters = sorted(ds._characters)
    label_of = {name: i for i, name in enumerate(characters)}
    items = sorted((ds._characters[idx], image) for image, idx in ds._flat_character_images)
    images = np.stack([_read_gray(Path(ds.target_folder) / char / image, size) for char, image in items])
    labels = torch.tensor([label_of[char] for char, _ in items], dtype=torch.int64)
    return to_float_images(images), labels, tuple(characters)


def _read_gray(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.LANCZOS))
