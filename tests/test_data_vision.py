"""The real vision loaders, each on a tiny fixture written in the dataset's on-disk layout."""

import pickle

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from fwdgrad.data import DatasetCorrupted, DatasetNotFound, build_dataset, load_cifar10_c


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(n, start):
    """Rows of 3072 bytes (R, G, B planes) where image i is filled with value start + i."""
    return np.repeat((start + np.arange(n, dtype=np.uint8))[:, None], 3072, axis=1)


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(1, 6):
        _pickle(folder / f"data_batch_{b}", {"data": _cifar_rows(4, 10 * b), "labels": [b, b, 0, 9]})
    _pickle(folder / "test_batch", {"data": _cifar_rows(3, 200), "labels": [0, 9, 9]})
    _pickle(
        folder / "batches.meta",
        {
            "label_names": [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
        },
    )
    return tmp_path


def test_cifar10_reads_pickled_batches(cifar10_root):
    splits = build_dataset("cifar10", cifar10_root, verify=False)
    x, y = splits.train.tensors
    assert x.shape == (20, 3, 32, 32) and y.tolist() == [b for k in range(1, 6) for b in (k, k, 0, 9)]
    assert float(x[0, 2, 5, 5]) == pytest.approx(10 / 255) and float(x[4, 0, 0, 0]) == pytest.approx(20 / 255)
    assert splits.test.tensors[1].tolist() == [0, 9, 9] and splits.classes[9] == "truck"
    subset = build_dataset("cifar10", cifar10_root, verify=False, classes=[9, 0], size=16)
    assert subset.test.tensors[1].tolist() == [1, 0, 0] and subset.classes == ("truck", "airplane")
    assert subset.test.tensors[0].shape == (3, 3, 16, 16) and subset.train.tensors[1].tolist() == [1, 0] * 5


def test_cifar10_checksums_and_missing_files(cifar10_root):
    with pytest.raises(DatasetCorrupted, match="data_batch_1 fails its md5 check.*verify=False"):
        build_dataset("cifar10", cifar10_root)
    (cifar10_root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetNotFound, match="test_batch; pass download=True or extract cifar-10-python"):
        build_dataset("cifar10", cifar10_root, verify=False)


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _pickle(
        folder / "train",
        {"data": _cifar_rows(5, 0), "fine_labels": [0, 1, 2, 99, 50], "coarse_labels": [0] * 5},
    )
    _pickle(folder / "test", {"data": _cifar_rows(2, 9), "fine_labels": [99, 3], "coarse_labels": [0, 0]})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})
    splits = build_dataset("cifar100", tmp_path, verify=False)
    assert splits.train.tensors[1].tolist() == [0, 1, 2, 99, 50] and splits.num_classes == 100
    assert splits.test.tensors[0].shape == (2, 3, 32, 32) and splits.classes[99] == "c99"


def test_svhn_reads_mat_files_and_maps_ten_to_zero(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 4)):
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)
        x[:, :, 1, :] = 128
        y = (np.arange(n) % 10 + 1).reshape(n, 1)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    splits = build_dataset("svhn", tmp_path, verify=False)
    assert splits.train.tensors[1].tolist() == [1, 2, 3, 4, 5, 6] and splits.test.tensors[1].tolist() == [
        1,
        2,
        3,
        4,
    ]
    assert splits.train.tensors[0].shape == (6, 3, 32, 32)
    assert float(splits.train.tensors[0][0, 1].mean()) == pytest.approx(128 / 255)
    assert float(splits.train.tensors[0][0, 0].max()) == 0.0
    with pytest.raises(DatasetCorrupted, match="train_32x32.mat fails its md5 check"):
        build_dataset("svhn", tmp_path)
    with pytest.raises(DatasetNotFound, match="svhn/train_32x32.mat"):
        build_dataset("svhn", tmp_path / "empty", verify=False)


def _omniglot_tree(root):
    for target, alphabets in (("images_background", ("Latin", "Greek")), ("images_evaluation", ("Korean",))):
        for alphabet in alphabets:
            for c in (2, 1):
                folder = root / "omniglot-py" / target / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for k in range(3):
                    img = np.full((105, 105), 255, dtype=np.uint8)
                    img[10 * c : 10 * c + 30, 20 * k : 20 * k + 10] = 0
                    Image.fromarray(img).save(folder / f"{c:02d}{k:02d}_{k + 1:02d}.png")


def test_omniglot_reads_png_tree_with_sorted_labels(tmp_path):
    _omniglot_tree(tmp_path)
    splits = build_dataset("omniglot", tmp_path, verify=False, size=28)
    x, y = splits.train.tensors
    assert x.shape == (12, 1, 28, 28) and 0 <= float(x.min()) < 0.5 and float(x.max()) == pytest.approx(1.0)
    assert splits.classes == (
        "Greek/character01",
        "Greek/character02",
        "Latin/character01",
        "Latin/character02",
    )
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert (
        splits.info["test_classes"] == ("Korean/character01", "Korean/character02") and len(splits.test) == 6
    )
    with pytest.raises(DatasetNotFound, match="images_background.zip.*verify=False"):
        build_dataset("omniglot", tmp_path)


def test_cifar10_c_reads_the_stacked_severity_blocks(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    labels = np.tile(np.arange(20) % 10, 5)
    for name, offset in (("gaussian_noise", 0), ("fog", 100)):
        images = np.repeat(np.arange(5, dtype=np.uint8) + offset, 20)[:, None, None, None] * np.ones(
            (1, 32, 32, 3), dtype=np.uint8
        )
        np.save(folder / f"{name}.npy", images)
    np.save(folder / "labels.npy", labels)
    images, lab, base = load_cifar10_c(tmp_path, ["gaussian_noise", "fog"], "medium")
    assert (
        images.shape == (40, 32, 32, 3)
        and set(images[:20].ravel()) == {2}
        and set(images[20:].ravel()) == {102}
    )
    assert lab.tolist() == labels[:20].tolist() * 2 and base.tolist() == list(range(20)) * 2
    splits = build_dataset(
        "cifar10_c", tmp_path, corruption=["gaussian_noise", "fog"], severity=5, adapt_fraction=0.5
    )
    assert len(splits.train) == 20 and len(splits.test) == 20 and splits.classes[0] == "airplane"
    assert float(splits.train.tensors[0].max()) == pytest.approx(104 / 255)
    assert splits.train.tensors[0].shape[1:] == (3, 32, 32)
    with pytest.raises(DatasetNotFound, match="CIFAR-10-C/shot_noise.npy.*zenodo"):
        load_cifar10_c(tmp_path, "shot_noise", 1)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        load_cifar10_c(tmp_path, "rain", 1)
    assert torch.equal(splits.test.tensors[1], torch.as_tensor(splits.test.tensors[1]))
