"""Fashion-MNIST from Debian-style IDX files, and the generated Fashion-MNIST-C benchmark."""

import gzip
import struct

import numpy as np
import pytest
import torch

from fwdgrad.data import DEBIAN_FASHION_DIR, DatasetNotFound, build_dataset, prepare_fashion_mnist
from fwdgrad.data.c_benchmark import adaptation_split, make_fashion_mnist_c


def _write_idx(path, array):
    """An IDX file as the originals are: big-endian magic (0, 0, ubyte, ndim), dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def debian_dir(tmp_path_factory):
    """A stand-in for /usr/share/datasets/fashion-mnist: gzipped IDX files, 10 classes."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 100)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28)) // (1 + labels[:, None, None])
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_prepare_gunzips_into_torchvision_layout_and_loads(tmp_path, debian_dir):
    raw = prepare_fashion_mnist(tmp_path, source=debian_dir)
    assert raw == tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]
    splits = build_dataset("fashion_mnist", tmp_path, source=debian_dir)
    x, y = splits.train.tensors
    assert x.shape == (60, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [i % 10 for i in range(60)] and len(splits.test) == 100
    assert splits.classes[0] == "T-shirt/top"
    with gzip.open(debian_dir / "t10k-images-idx3-ubyte.gz") as f:
        first = np.frombuffer(f.read()[16 : 16 + 784], dtype=np.uint8).reshape(28, 28)
    assert torch.equal(splits.test.tensors[0][0, 0], torch.from_numpy(first / 255.0).float())


def test_missing_fashion_mnist_names_path_and_remedy(tmp_path):
    with pytest.raises(
        DatasetNotFound, match="FashionMNIST/raw.*apt-get install dataset-fashion-mnist.*download=True"
    ):
        prepare_fashion_mnist(tmp_path / "root", source=tmp_path / "nothing-here")


def test_fashion_mnist_c_is_cached_deterministic_and_split_90_10(tmp_path, debian_dir):
    kwargs = dict(corruption=["gaussian_noise", "pixelate"], severity="medium", source=debian_dir)
    splits = build_dataset("fashion_mnist_c", tmp_path / "a", seed=0, **kwargs)
    assert splits.info["severity"] == 3 and splits.info["corruptions"] == ["gaussian_noise", "pixelate"]
    assert len(splits.train) == 180 and len(splits.test) == 20  # 2 corruptions x 100 images, 90/10
    cached = tmp_path / "a" / "FashionMNIST-C" / "v1-seed0"
    assert sorted(p.name for p in cached.iterdir()) == [
        "gaussian_noise_s3.npy",
        "labels.npy",
        "pixelate_s3.npy",
    ]
    build_dataset("fashion_mnist_c", tmp_path / "b", seed=0, **kwargs)
    other = tmp_path / "b" / "FashionMNIST-C" / "v1-seed0"
    for name in ("gaussian_noise_s3.npy", "pixelate_s3.npy"):
        assert (cached / name).read_bytes() == (other / name).read_bytes()
    clean = build_dataset("fashion_mnist", tmp_path / "a", source=debian_dir).test.tensors[0]
    images, labels, base = make_fashion_mnist_c(tmp_path / "a", "gaussian_noise", 3, source=debian_dir)
    assert images.shape == (100, 28, 28) and images.dtype == np.uint8
    assert np.abs(images / 255.0 - clean[:, 0].numpy()).mean() > 0.01
    # a different run seed moves the split, not the corrupted images
    reseeded = build_dataset("fashion_mnist_c", tmp_path / "a", seed=1, **kwargs)
    assert not torch.equal(reseeded.test.tensors[0], splits.test.tensors[0])


def test_adaptation_split_keeps_copies_of_a_base_image_together():
    labels = np.tile(np.arange(100) % 10, 3)
    base = np.tile(np.arange(100), 3)
    adapt, test = adaptation_split(labels, base, 0.9, seed=0)
    assert len(test) == 30 and len(adapt) == 270
    assert not set(base[adapt]) & set(base[test])
    assert np.bincount(labels[test]).tolist() == [3] * 10


@pytest.mark.skipif(
    not (DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist(tmp_path):
    splits = build_dataset("fashion_mnist", tmp_path)
    assert splits.train.tensors[0].shape == (60000, 1, 28, 28) and len(splits.test) == 10000
    assert torch.bincount(splits.test.tensors[1]).tolist() == [1000] * 10
