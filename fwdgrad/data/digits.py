"""scikit-learn's bundled 8x8 handwritten digits: the embedded default dataset, always offline.

1,797 real images (UCI optical digits, 16 grey levels) ship inside scikit-learn, so this dataset
needs no download and no root directory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from fwdgrad.data.images import to_float_images
from fwdgrad.data.splits import class_subset_split

DIGIT_CLASSES = tuple(str(d) for d in range(10))


def load_digits_tensors(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 images (N,1,size,size) in [0, 1] (pixels / 16) and int64 labels.

    ``size`` other than 8 upsamples (or downsamples) bilinearly, e.g. 16 or 32 for models that
    expect larger inputs.
    """
    bunch = load_digits()
    images = to_float_images(bunch.images, size=size, scale=16.0)
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def digits_split(
    classes: Sequence[int] = range(10), size: int = 8, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Train/test ``TensorDataset``s of the digits in ``classes``, relabelled ``0..len(classes)-1``.

    The split is stratified and seeded; e.g. ``digits_split(range(5))`` is a source task and
    ``digits_split(range(5, 10))`` the matching target task.
    """
    images, labels = load_digits_tensors(size)
    return class_subset_split(images, labels, classes, test_fraction, seed)
