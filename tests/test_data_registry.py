"""build_dataset: names, options, errors."""

import pytest
import torch

from fwdgrad.data import DATASETS, build_dataset, dataset_options


def test_registry_lists_every_dataset():
    assert set(DATASETS) == {
        "digits",
        "fashion_mnist",
        "fashion_mnist_c",
        "synth_keywords",
        "cifar10",
        "cifar100",
        "cifar10_c",
        "svhn",
        "omniglot",
        "speechcommands",
        "esc50",
    }
    assert dataset_options("fashion_mnist_c")["severity"] == "hard"
    assert dataset_options("fashion_mnist_c")["adapt_fraction"] == 0.9


def test_build_digits_subset(tmp_path):
    splits = build_dataset("digits", tmp_path, seed=1, classes=[5, 6, 7, 8, 9], size=16)
    x, y = splits.train.tensors
    assert splits.classes == ("5", "6", "7", "8", "9") and splits.num_classes == 5
    assert x.shape[1:] == (1, 16, 16) and set(y.tolist()) == set(range(5))
    assert not splits.synthetic
    again = build_dataset("digits", tmp_path, seed=1, classes=[5, 6, 7, 8, 9], size=16)
    assert torch.equal(again.test.tensors[0], splits.test.tensors[0])


def test_unknown_dataset_and_option_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; allowed: digits, fashion_mnist"):
        build_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="unknown option 'severity' for dataset 'digits'; allowed: classes"):
        build_dataset("digits", tmp_path, severity=3)
