"""``build_dataset(name, root=None, seed=0, **options) -> DataSplits``: every dataset by name.

Names: ``digits``, ``fashion_mnist``, ``fashion_mnist_c``, ``synth_keywords``, ``cifar10``, ``cifar100``,
``cifar10_c``, ``svhn``, ``omniglot``, ``speechcommands``, ``esc50``. ``root`` is the data home
(default ``$FWDGRAD_DATA`` or ``~/.cache/fwdgrad/data``); ``seed`` drives the seeded splits (digits,
-C adaptation split, keyword voice split) and is ignored where the split is fixed. ``options`` are the
keyword arguments of the dataset's builder below; an unknown name or option is a ``ValueError``.
Image sets come back as ``TensorDataset(float32 (N,C,H,W) in [0,1], int64 labels)``; the real audio
sets as lazily-read :class:`~fwdgrad.data.audio.AudioClips`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from fwdgrad.data.audio import SPEECH_COMMANDS_WORDS, load_esc50, load_speechcommands
from fwdgrad.data.c_benchmark import (
    CIFAR10_C_CORRUPTIONS,
    CIFAR10_C_EXTRA,
    adaptation_split,
    load_cifar10_c,
    make_fashion_mnist_c,
    resolve_corruptions,
)
from fwdgrad.data.corruptions import CORRUPTIONS, resolve_severity
from fwdgrad.data.digits import DIGIT_CLASSES, digits_split
from fwdgrad.data.errors import check_choice
from fwdgrad.data.fashion import DEBIAN_FASHION_DIR, FASHION_CLASSES, load_fashion_mnist
from fwdgrad.data.features import compute_features
from fwdgrad.data.images import to_float_images
from fwdgrad.data.keywords import (
    CORE_WORDS,
    DEFAULT_VOICES,
    DIGIT_WORDS,
    KeywordConfig,
    keyword_cache,
    load_keywords,
    voice_split,
)
from fwdgrad.data.splits import class_subset, stratified_split
from fwdgrad.data.vision import load_cifar, load_omniglot, load_svhn

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class DataSplits:
    """A dataset ready for training: ``train`` and ``test`` with labels ``0..len(classes)-1``.

    For the -C benchmarks ``train`` is the adaptation split and ``test`` the held-out corrupted split;
    for Omniglot the two sets have disjoint classes (``info["test_classes"]``). ``synthetic`` marks
    generated data whose results must be labelled as such.
    """

    name: str
    train: Dataset
    test: Dataset
    classes: tuple[str, ...]
    synthetic: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_root() -> Path:
    """``$FWDGRAD_DATA`` if set, else ``~/.cache/fwdgrad/data``."""
    return Path(os.environ.get("FWDGRAD_DATA", Path.home() / ".cache" / "fwdgrad" / "data")).expanduser()


def _tensor_splits(name: str, train: tuple, test: tuple, names: Sequence[str], classes) -> DataSplits:
    """Wrap (images, labels) pairs, optionally keeping only ``classes`` (relabelled by position)."""
    if classes is not None:
        train, test = (class_subset(*part, classes, len(names)) for part in (train, test))
        names = [names[int(c)] for c in classes]
    return DataSplits(name, TensorDataset(*train), TensorDataset(*test), tuple(names))


def _digits(
    root: Path, seed: int, classes: Sequence[int] | None = None, size: int = 8, test_fraction: float = 0.2
) -> DataSplits:
    classes = list(range(10)) if classes is None else [int(c) for c in classes]
    train, test = digits_split(classes, size, test_fraction, seed)
    return DataSplits("digits", train, test, tuple(DIGIT_CLASSES[c] for c in classes))


def _fashion_mnist(
    root: Path,
    classes: Sequence[int] | None = None,
    size: int | None = None,
    source: str | Path = DEBIAN_FASHION_DIR,
    download: bool = False,
) -> DataSplits:
    train, test = (load_fashion_mnist(root, split, size, source, download) for split in (True, False))
    return _tensor_splits("fashion_mnist", train, test, FASHION_CLASSES, classes)


def _corrupted_splits(
    name: str,
    arrays: tuple,
    seed: int,
    adapt_fraction: float,
    size: int | None,
    channels_last: bool,
    classes: Sequence[str],
    info: dict,
) -> DataSplits:
    images, labels, base = arrays
    adapt, test = adaptation_split(labels, base, adapt_fraction, seed)
    labels = torch.as_tensor(labels, dtype=torch.int64)

    def part(rows):
        return TensorDataset(to_float_images(images[rows], size, channels_last=channels_last), labels[rows])

    return DataSplits(
        name, part(adapt), part(test), tuple(classes), info={**info, "adapt_fraction": adapt_fraction}
    )


def _fashion_mnist_c(
    root: Path,
    seed: int,
    corruption: str | Sequence[str] = "all",
    severity: int | str = "hard",
    adapt_fraction: float = 0.9,
    data_seed: int = 0,
    size: int | None = None,
    source: str | Path = DEBIAN_FASHION_DIR,
    download: bool = False,
) -> DataSplits:
    arrays = make_fashion_mnist_c(root, corruption, severity, data_seed, source, download)
    names = resolve_corruptions(corruption, CORRUPTIONS, CORRUPTIONS)
    info = {"corruptions": names, "severity": resolve_severity(severity), "data_seed": data_seed}
    return _corrupted_splits(
        "fashion_mnist_c", arrays, seed, adapt_fraction, size, False, FASHION_CLASSES, info
    )


def _cifar10_c(
    root: Path,
    seed: int,
    corruption: str | Sequence[str] = "all",
    severity: int | str = "hard",
    adapt_fraction: float = 0.9,
    size: int | None = None,
) -> DataSplits:
    arrays = load_cifar10_c(root, corruption, severity)
    names = resolve_corruptions(corruption, CIFAR10_C_CORRUPTIONS + CIFAR10_C_EXTRA, CIFAR10_C_CORRUPTIONS)
    info = {"corruptions": names, "severity": resolve_severity(severity)}
    return _corrupted_splits("cifar10_c", arrays, seed, adapt_fraction, size, True, CIFAR10_CLASSES, info)


def _cifar(hundred: bool) -> Callable[..., DataSplits]:
    def build(
        root: Path,
        classes: Sequence[int] | None = None,
        size: int | None = None,
        verify: bool = True,
        download: bool = False,
    ) -> DataSplits:
        *train, names = load_cifar(root, True, hundred, size, verify, download)
        *test, _ = load_cifar(root, False, hundred, size, verify, download)
        return _tensor_splits("cifar100" if hundred else "cifar10", tuple(train), tuple(test), names, classes)

    return build


def _svhn(
    root: Path,
    classes: Sequence[int] | None = None,
    size: int | None = None,
    verify: bool = True,
    download: bool = False,
) -> DataSplits:
    train, test = (load_svhn(root, split, size, verify, download) for split in (True, False))
    return _tensor_splits("svhn", train, test, [str(d) for d in range(10)], classes)


def _omniglot(root: Path, size: int = 28, verify: bool = True, download: bool = False) -> DataSplits:
    *train, names = load_omniglot(root, True, size, verify, download)
    *test, test_names = load_omniglot(root, False, size, verify, download)
    return DataSplits(
        "omniglot", TensorDataset(*train), TensorDataset(*test), names, info={"test_classes": test_names}
    )


def _synth_keywords(
    root: Path,
    seed: int,
    words: Sequence[str] = CORE_WORDS + DIGIT_WORDS,
    voices: Sequence[str] = DEFAULT_VOICES,
    clips_per_word: int = 40,
    data_seed: int = 0,
    features: str = "logmel",
    test_fraction: float = 0.2,
    split_by: str = "voice",
    rate_range: Sequence[int] = (130, 210),
    pitch_range: Sequence[int] = (25, 75),
    snr_db_range: Sequence[float] | None = (5.0, 30.0),
) -> DataSplits:
    check_choice("split_by", split_by, ("voice", "clip"))
    config = KeywordConfig(  # plain tuples of ints/floats, so lists from a config file hash the same
        tuple(str(w) for w in words),
        tuple(str(v) for v in voices),
        int(clips_per_word),
        int(data_seed),
        tuple(int(r) for r in rate_range),
        tuple(int(p) for p in pitch_range),
        None if snr_db_range is None else tuple(float(s) for s in snr_db_range),
    )
    folder = keyword_cache(root, config)
    waves, labels, rows = load_keywords(folder, config.words)
    if split_by == "voice":
        train, test = voice_split(rows, test_fraction, seed)
    else:
        train, test = stratified_split(labels.numpy(), test_fraction, seed)
    x = compute_features(waves, features, config.sample_rate)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return DataSplits(
        "synth_keywords",
        TensorDataset(x[train], labels[train]),
        TensorDataset(x[test], labels[test]),
        config.words,
        synthetic=True,
        info={"cache": str(folder), "features": features},
    )


def _speechcommands(root: Path, words: Sequence[str] | None = None, download: bool = False) -> DataSplits:
    train = load_speechcommands(root, "training", words, download)
    test = load_speechcommands(root, "testing", words, download)
    return DataSplits("speechcommands", train, test, tuple(words or SPEECH_COMMANDS_WORDS))


def _esc50(
    root: Path, test_fold: int = 5, sample_rate: int = 16000, classes: Sequence[int] | None = None
) -> DataSplits:
    train, test, names = load_esc50(root, test_fold, sample_rate, classes)
    return DataSplits("esc50", train, test, names)


BUILDERS: dict[str, Callable[..., DataSplits]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "fashion_mnist_c": _fashion_mnist_c,
    "synth_keywords": _synth_keywords,
    "cifar10": _cifar(hundred=False),
    "cifar100": _cifar(hundred=True),
    "cifar10_c": _cifar10_c,
    "svhn": _svhn,
    "omniglot": _omniglot,
    "speechcommands": _speechcommands,
    "esc50": _esc50,
}
DATASETS = tuple(BUILDERS)


def dataset_options(name: str) -> dict[str, Any]:
    """The options ``build_dataset`` accepts for ``name``, with their defaults."""
    check_choice("dataset", name, DATASETS)
    params = inspect.signature(BUILDERS[name]).parameters
    return {k: p.default for k, p in params.items() if k not in ("root", "seed")}


def build_dataset(name: str, root: str | Path | None = None, seed: int = 0, **options: Any) -> DataSplits:
    """Build dataset ``name`` (see the module docstring) from ``root`` with ``options``."""
    allowed = dataset_options(name)
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} for dataset {name!r}; allowed: {', '.join(allowed)}")
    builder = BUILDERS[name]
    if "seed" in inspect.signature(builder).parameters:
        options["seed"] = seed
    return builder(Path(root) if root is not None else default_root(), **options)
