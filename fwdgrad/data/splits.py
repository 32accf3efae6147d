"""Seeded, stratified index splits and class-subset splits on in-memory tensors.

All randomness comes from a local ``numpy.random.Generator`` built from the ``seed`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset


def stratified_split(
    labels: np.ndarray | torch.Tensor, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(labels)-1`` into (train, test), keeping class proportions.

    Each class contributes ``round(test_fraction * n_class)`` examples to the test side (at least one
    and at most ``n_class - 1`` when the class has two or more examples). Both index arrays are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def class_subset(
    images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the examples whose label is in ``classes`` and relabel them ``0..len(classes)-1``.

    The new label of an example is the position of its old label in ``classes``. ``classes`` must be
    distinct and in ``range(num_classes)`` (default: one more than the largest label).
    """
    classes = [int(c) for c in classes]
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"classes {classes} must be distinct values in range({num_classes})")
    lookup = torch.full((num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    keep = lookup[labels] >= 0
    return images[keep], lookup[labels[keep]]


def class_subset_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[TensorDataset, TensorDataset]:
    """Class subset (relabelled ``0..k-1``) followed by a seeded stratified train/test split.

    Example: source classes 0-4 and target classes 5-9 of the digits::

        src_train, src_test = class_subset_split(x, y, range(5), 0.2, seed=0)
        tgt_train, tgt_test = class_subset_split(x, y, range(5, 10), 0.2, seed=0)
    """
    x, y = class_subset(images, labels, classes)
    train_idx, test_idx = stratified_split(y.numpy(), test_fraction, seed)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])
