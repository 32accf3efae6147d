"""The embedded digits dataset and the seeded class-subset splits."""

import numpy as np
import pytest
import torch

from fwdgrad.data import class_subset, class_subset_split, digits_split, load_digits_tensors, stratified_split


def test_digits_tensors_are_scaled_images_with_all_classes():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # pixels / 16


def test_digits_upscaling_keeps_range_and_content():
    small, _ = load_digits_tensors(8)
    big, _ = load_digits_tensors(32)
    assert big.shape == (1797, 1, 32, 32)
    assert 0.0 <= float(big.min()) and float(big.max()) <= 1.0
    pooled = torch.nn.functional.avg_pool2d(big, 4).flatten()
    assert float(torch.corrcoef(torch.stack([pooled, small.flatten()]))[0, 1]) > 0.9


def test_source_and_target_splits_have_the_requested_classes():
    src_train, src_test = digits_split(range(5), seed=0)
    tgt_train, tgt_test = digits_split(range(5, 10), seed=0)
    x, y = load_digits_tensors()
    for train, test, classes in ((src_train, src_test, range(5)), (tgt_train, tgt_test, range(5, 10))):
        assert set(train.tensors[1].tolist()) == set(range(5)) == set(test.tensors[1].tolist())
        assert len(train) + len(test) == int(sum((y == c).sum() for c in classes))
        assert abs(len(test) / (len(train) + len(test)) - 0.2) < 0.01
    # relabelling maps target digit 5 to 0: the images labelled 0 in the target task are real 5s
    fives = x[y == 5]
    first = tgt_train.tensors[0][tgt_train.tensors[1] == 0][0]
    assert any(torch.equal(first, f) for f in fives)


def test_split_is_seeded_and_disjoint():
    a_train, a_test = digits_split(range(10), seed=3)
    b_train, b_test = digits_split(range(10), seed=3)
    c_train, _ = digits_split(range(10), seed=4)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0]) and torch.equal(
        a_test.tensors[1], b_test.tensors[1]
    )
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])
    labels = np.repeat(np.arange(4), 25)
    train, test = stratified_split(labels, 0.2, seed=1)
    assert not set(train) & set(test) and len(train) + len(test) == 100
    assert np.bincount(labels[test]).tolist() == [5, 5, 5, 5]


def test_bad_classes_and_fractions_are_value_errors():
    x, y = load_digits_tensors()
    with pytest.raises(ValueError, match="classes \\[3, 11\\] must be distinct values in range\\(10\\)"):
        class_subset(x, y, [3, 11])
    with pytest.raises(ValueError, match="distinct"):
        class_subset(x, y, [3, 3])
    with pytest.raises(ValueError, match="test_fraction"):
        class_subset_split(x, y, [0, 1], test_fraction=1.5)
